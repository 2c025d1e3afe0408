"""The files of a checkpoint-<step>/ folder that train writes, named once for every step that reads one (without
importing torch, so the light steps stay light)."""
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers format
KOHYA_WEIGHTS = "kohya_lora.safetensors"  # A1111 / ComfyUI format
CHECKPOINT_INFO = "dreamline.json"  # what it is: step, learning rate, MLflow run, base model, training seconds
# What resuming needs (see train.step_randomness): LoRA, optimizer, schedule and loss scaler, as tensors and the rest
# (sd_tasks.training_state); never a pickle, which Dreamline wrote before and now refuses by this name.
TRAINING_STATE = "training_state.safetensors"
TRAINING_STATE_INFO = "training_state.json"
PICKLED_TRAINING_STATE = "training_state.pt"
