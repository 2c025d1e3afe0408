"""DreamBooth-LoRA for SDXL on the encode cache.

`run` is the whole loop on one screen; everything else in this module is a small function it calls. The UNet is
frozen and gets peft LoRA adapters on its attention projections; each step samples a latent from the cached VAE
distribution, noises it at a random timestep and regresses the UNet's prediction on the noise (or velocity),
conditioned on the cached text embeddings and SDXL's time ids. Every `checkpointing_steps` the LoRA is written in
diffusers format, with a `dreamline.json` that says what it is.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sd_tasks import models, tracking
from sd_tasks.cli import option
from sd_tasks.errors import StepError
from sd_tasks.storage import join, read_dir, read_json, write_dir, write_json

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CHECKPOINT_INFO = "dreamline.json"


@dataclass
class TrainConfig:
    """Train a DreamBooth-LoRA on an encode cache; write checkpoint-<step>/ folders."""

    cache: str = option("encode's output (URI)")
    output: str = option("URI to write checkpoint-<step>/ folders to")
    base_model: str = option("SDXL pipeline: model id or local diffusers folder")
    learning_rate: float = option("AdamW learning rate", 1e-4)
    max_steps: int = option("optimisation steps", 500)
    checkpointing_steps: int = option("write a checkpoint every this many steps (and at the end)", 100)
    rank: int = option("LoRA rank", 4)
    lora_alpha: float | None = option("LoRA alpha (default: the rank, so the scale is 1)", None)
    batch_size: int = option("images per step", 1)
    lr_scheduler: str = option("constant, linear, cosine, ... (diffusers.optimization)", "constant")
    lr_warmup_steps: int = option("linear warmup steps", 0)
    max_grad_norm: float = option("clip gradients to this norm", 1.0)
    mixed_precision: str = option("no, fp16 or bf16", "no")
    gradient_checkpointing: bool = option("trade compute for memory in the UNet", False)
    seed: int = option("seed for LoRA init, data order, noise and timesteps", 0)
    experiment: str = option("MLflow experiment", "dreamline")
    parent_run_id: str | None = option("MLflow parent run to nest this training run under", None)
    tags: list[str] = option("extra MLflow tags as key=value (e.g. the dataset's lineage)", [])


def run(config: TrainConfig) -> dict:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    torch.manual_seed(config.seed)
    data = LatentCache(config.cache)
    noise_scheduler = DDPMScheduler.from_pretrained(config.base_model, subfolder="scheduler")
    unet = models.load_unet(config.base_model)
    add_lora(unet, config)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    noise = torch.Generator().manual_seed(config.seed)
    batches = data.batches(config.batch_size, seed=config.seed)
    checkpoints, started = [], time.perf_counter()

    with training_run(config) as mlflow_run:
        for step in range(1, config.max_steps + 1):
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            with accelerator.autocast():
                loss = diffusion_loss(unet, noise_scheduler, batch, data.scaling_factor, noise)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            stop_if_not_finite(loss, step)
            mlflow_run.log_metrics({"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if step % config.checkpointing_steps == 0 or step == config.max_steps:
                checkpoints.append(save_checkpoint(accelerator.unwrap_model(unet), config, step, mlflow_run.id))

        seconds = time.perf_counter() - started
        mlflow_run.log_metrics({"images_per_second": config.max_steps * config.batch_size / seconds,
                                "train_seconds": seconds, **peak_memory()})
    return {"run_id": mlflow_run.id, "learning_rate": config.learning_rate, "final_loss": loss.item(),
            "checkpoints": checkpoints}


def add_lora(unet, config: TrainConfig) -> None:
    """Freeze the UNet, then add trainable LoRA adapters on its attention projections (the reference script's
    targets, with its gaussian init)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(
        r=config.rank, lora_alpha=config.lora_alpha or config.rank, init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    ))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()


def diffusion_loss(unet, noise_scheduler, batch: dict, scaling_factor: float, generator: torch.Generator):
    """The denoising objective at one random timestep per image."""
    mean, logvar = batch["latent_moments"].chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    latents = (mean + std * randn_like(mean, generator)) * scaling_factor
    noise = randn_like(latents, generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, batch["prompt_embeds"],
                      added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]},
                      ).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())


def randn_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same noise on every device.
    return torch.randn(tensor.shape, generator=generator).to(tensor.device, tensor.dtype)


def stop_if_not_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise StepError(f"loss is {loss.item()} at step {step}: training diverged (lower the learning rate)")


def save_checkpoint(unet, config: TrainConfig, step: int, run_id: str) -> dict:
    """Write checkpoint-<step>/ atomically: the diffusers-format LoRA plus what it was trained from."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    uri = join(config.output, f"checkpoint-{step}")
    with write_dir(uri) as out:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
        write_json(out / CHECKPOINT_INFO, {"step": step, "learning_rate": config.learning_rate, "run_id": run_id,
                                           "base_model": config.base_model, "cache": config.cache,
                                           "rank": config.rank})
    return {"step": step, "uri": uri}


class training_run:
    """The MLflow run of one learning rate, nested under the pipeline's parent run; FAILED if training raises."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def __enter__(self):
        import mlflow

        tracking.client()  # points mlflow at the tracking URI
        key = f"{self.config.parent_run_id or 'standalone'}/lr={self.config.learning_rate:g}"
        self.id = tracking.find_or_create_run(
            self.config.experiment, key, f"lr={self.config.learning_rate:g}",
            tags={"dreamline.learning_rate": f"{self.config.learning_rate:g}", **tracking.parse_tags(self.config.tags)},
            parent_run_id=self.config.parent_run_id)
        self._active = mlflow.start_run(run_id=self.id)
        mlflow.log_params({k: v for k, v in asdict(self.config).items() if k not in ("parent_run_id", "tags")})
        return self

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def __exit__(self, exc_type, exc, tb):
        import mlflow

        mlflow.end_run("FAILED" if exc_type else "FINISHED")
        return False


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class LatentCache:
    """The encode cache in memory: per image its latent moments, text embeddings and SDXL time ids."""

    def __init__(self, uri: str):
        from safetensors.torch import load_file

        folder = read_dir(uri)
        manifest = read_json(f"{uri}/manifest.json")
        shards = {name: load_file(Path(folder) / name / "latents.safetensors") for name in manifest["shards"]}
        self.scaling_factor = manifest["scaling_factor"]
        self.items = [
            {
                **{t: shards[r["shard"]][f"{r['key']}.{t}"].float()
                   for t in ("latent_moments", "prompt_embeds", "pooled_prompt_embeds")},
                "time_ids": models.sdxl_time_ids(r["original_size"], r["crop_top_left"], r["target_size"]),
            }
            for r in manifest["records"]
        ]
        if not self.items:
            raise StepError(f"{uri}: the encode cache holds no images")

    def batches(self, batch_size: int, seed: int):
        """Endless shuffled epochs; a batch only mixes images of one bucket (one latent shape)."""
        rng = random.Random(seed)
        while True:
            order = list(range(len(self.items)))
            rng.shuffle(order)
            by_shape: dict[tuple, list[int]] = {}
            for i in order:
                by_shape.setdefault(tuple(self.items[i]["latent_moments"].shape), []).append(i)
            chunks = [ids[j:j + batch_size] for ids in by_shape.values() for j in range(0, len(ids), batch_size)]
            rng.shuffle(chunks)
            for chunk in chunks:
                yield {k: torch.stack([self.items[i][k] for i in chunk]) for k in self.items[0]}
