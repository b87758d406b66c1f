"""Compile the seed's usage example (tests/data/seed_example_pipeline.py: the seed's text with only the import line
changed) to YAML. Runs in .venv-kfp.

    compile_example.py EXAMPLE.py OUT_DIR

Writes OUT_DIR/result.json: whether the text as given compiled (and kfp's error if not), and the YAML of the same
pipeline given the workspace size that kfp>=2.15 asks of any pipeline using dsl.WORKSPACE_PATH_PLACEHOLDER.
"""

import json
import sys
from pathlib import Path

from kfp import compiler

SEED_DECORATOR = '@dsl.pipeline(name="my-lora-pipeline")'
WITH_WORKSPACE = ('@dsl.pipeline(name="my-lora-pipeline", '
                  'pipeline_config=dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(size="10Gi")))')


def compile_text(text: str, package_path: Path) -> str | None:
    """Compile the pipeline the text defines; kfp's error message when it cannot."""
    namespace: dict = {}
    try:
        exec(compile(text, "seed_example_pipeline.py", "exec"), namespace)
        compiler.Compiler().compile(namespace["my_pipeline"], str(package_path))
    except Exception as exc:  # report kfp's own message to the test
        return f"{type(exc).__name__}: {exc}"
    return None


def main(example: str, out_dir: str) -> None:
    out = Path(out_dir)
    text = Path(example).read_text()
    as_given = compile_text(text, out / "as_given.yaml")
    assert text.count(SEED_DECORATOR) == 1
    with_workspace = compile_text(text.replace(SEED_DECORATOR, WITH_WORKSPACE), out / "pipeline.yaml")
    (out / "result.json").write_text(json.dumps({"as_given_error": as_given, "with_workspace_error": with_workspace}))


if __name__ == "__main__":
    main(*sys.argv[1:])
