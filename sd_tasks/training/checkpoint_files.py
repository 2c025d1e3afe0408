"""The files of a checkpoint-<step>/ folder that train writes, named once for every step that reads one (without
importing torch, so the light steps stay light)."""
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers format
KOHYA_WEIGHTS = "kohya_lora.safetensors"  # A1111 / ComfyUI format
CHECKPOINT_INFO = "dreamline.json"  # what it is: step, learning rate, MLflow run, base model, training seconds
# What resuming needs (see train.step_randomness): LoRA, optimizer, schedule and loss scaler, as tensors and the rest
# (sd_tasks.training.training_state); never a pickle, which Dreamline wrote before and now refuses by this name.
TRAINING_STATE = "training_state.safetensors"
TRAINING_STATE_INFO = "training_state.json"
PICKLED_TRAINING_STATE = "training_state.pt"


def adapter_metadata(lora_config) -> dict:
    """A peft LoraConfig as the metadata saved with the weights, sets as sorted lists: peft keeps target_modules as
    a set, whose order changes with the interpreter's hash seed, so the same weights gave a different file."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in lora_config.to_dict().items()}
