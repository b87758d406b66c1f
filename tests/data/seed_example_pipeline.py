from kfp import dsl
from airflow_provider_lora.kfp.component import train_model

@dsl.pipeline(name="my-lora-pipeline")
def my_pipeline():
    training_task = train_model(
        pvc_path=dsl.WORKSPACE_PATH_PLACEHOLDER,
        training_base_model="Qwen/Qwen2.5-1.5B-Instruct",
        training_num_epochs=3,
        training_effective_batch_size=128,
        training_max_seq_len=8192,
        training_lora_r=16,
        training_lora_alpha=32,
    )
