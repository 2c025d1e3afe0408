"""Training DreamBooth-LoRA on SDXL: the loop (`train`), its MLflow run and cost (`training_run`), what a resume needs
(`training_state`), the encode cache as training reads it (`latent_cache`), optional speedups (`speedups`), and the
checkpoint's files: LoRA weights for diffusers and for kohya-style tools (`checkpoint_files`, `lora_files`, `kohya`).

May use: data, safety, models and the core.
"""
