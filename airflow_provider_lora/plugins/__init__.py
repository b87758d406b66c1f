"""Airflow plugins shipped with the provider, loaded through the ``airflow.plugins`` entry point (pyproject.toml)."""
