"""The bundled LoRA trainer: ``python -m lora_trainer`` / ``lora-train``.

It knows nothing of Airflow, KFP or Kubernetes: it reads a LoRASpec and its environment (rank, world size) and
writes its run directory. Heavy libraries load only when training starts, so ``--help`` is instant.
"""
