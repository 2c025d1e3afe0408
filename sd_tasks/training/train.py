"""DreamBooth-LoRA for SDXL on the encode cache.

`run` is the whole loop on one screen; everything else in this module is a small function it calls. The UNet is
frozen and gets peft LoRA adapters on its attention projections; each step samples a latent from the cached VAE
distribution, noises it at a random timestep and regresses the UNet's prediction on the noise (or velocity),
conditioned on the cached text embeddings and SDXL's time ids. Every `checkpointing_steps` a checkpoint folder gets
the LoRA in diffusers and kohya formats, a `dreamline.json` that says what it is, and the training state; a
restarted run resumes from the newest one and ends with the weights an uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sd_tasks.core.config import option
from sd_tasks.core.cost import gpus_in_use, peak_memory
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import join, list_dir, read_dir, read_json, remove, why_not_whole, write_dir, write_json
from sd_tasks.models import loading
from sd_tasks.models.model_refs import local_folder
from sd_tasks.training import kohya, speedups, training_state
from sd_tasks.training.checkpoint_files import CHECKPOINT_INFO, KOHYA_WEIGHTS, LORA_WEIGHTS, TRAINING_STATE  # noqa: F401
from sd_tasks.training.checkpoint_files import adapter_metadata
from sd_tasks.training.latent_cache import LatentCache
from sd_tasks.training.training_run import cost, training_run


@dataclass
class TrainConfig:
    """Train a DreamBooth-LoRA on an encode cache; write checkpoint-<step>/ folders. Started again with the same
    arguments after a crash or a kill, it resumes from the latest checkpoint."""

    cache: str = option("encode's output (URI)")
    output: str = option("URI to write checkpoint-<step>/ folders to")
    base_model: str = option("SDXL pipeline: model id or local diffusers folder")
    class_cache: str | None = option("encode cache of class images: turns on prior preservation", None)
    prior_loss_weight: float = option("weight of the class images' loss (prior preservation)", 1.0, at_least=0)
    learning_rate: float = option("learning rate", 1e-4, above=0)
    max_steps: int = option("optimisation steps", 500, at_least=1, at_most=100_000)
    stop_at_step: int | None = option("stop at this step, with a checkpoint, to be resumed later (a rung of successive "
                                      "halving); the learning-rate schedule still spans max_steps", None,
                                      at_least=1, at_most=100_000)
    checkpointing_steps: int = option("write a checkpoint every this many steps (and at the end)", 100, at_least=1)
    checkpoints_total_limit: int | None = option("keep only the newest this many checkpoints", None, at_least=1)
    rank: int = option("LoRA rank", 4, at_least=1, at_most=256)
    lora_alpha: float | None = option("LoRA alpha (default: the rank, so the scale is 1)", None, above=0)
    lora_dropout: float = option("dropout on the LoRA path", 0.0, at_least=0, below=1)
    target_modules: list[str] = option("UNet modules that get LoRA adapters", ["to_k", "to_q", "to_v", "to_out.0"])
    dora: bool = option("weight-decomposed LoRA (DoRA); its checkpoints have no kohya file", False)
    train_text_encoder: bool = option("LoRA on both text encoders too (embeddings then computed every step)", False)
    text_encoder_lr: float | None = option("learning rate of the text encoders' LoRA (default: learning_rate)", None,
                                           above=0)
    batch_size: int = option("images per micro-batch", 1, at_least=1, at_most=1024)
    gradient_accumulation_steps: int = option("micro-batches per optimisation step", 1, at_least=1, at_most=1024)
    weight_decay: float = option("AdamW weight decay", 1e-2, at_least=0)
    lr_scheduler: str = option("constant, linear, cosine, ... (diffusers.optimization)", "constant")
    lr_warmup_steps: int = option("linear warmup steps", 0, at_least=0)
    max_grad_norm: float = option("clip gradients to this norm", 1.0, above=0)
    snr_gamma: float | None = option("min-SNR loss weighting gamma (5.0 is the paper's choice)", None, above=0)
    noise_offset: float = option("offset noise strength (helps very dark and bright images)", 0.0,
                                 at_least=0, at_most=1)
    mixed_precision: str = option("auto (bf16 on a CUDA GPU, none on the CPU), no, fp16 or bf16", "auto")
    gradient_checkpointing: bool = option("trade compute for memory in the UNet", False)
    compile: bool = option("torch.compile the UNet's repeated blocks (see sd_tasks.training.speedups)", False)
    channels_last: bool = option("UNet in channels-last memory format (see sd_tasks.training.speedups)", False)
    seed: int = option("seed for LoRA init, data order, noise and timesteps", 0, at_least=0, at_most=2**31 - 1)
    gpu_hour_price: float = option("price of one GPU-hour, for the estimated cost logged to MLflow", 2.5, at_least=0)
    experiment: str = option("MLflow experiment", "dreamline")
    parent_run_id: str | None = option("MLflow parent run to nest this training run under", None)
    tags: list[str] = option("extra MLflow tags as key=value (e.g. the dataset's lineage)", [])


def run(config: TrainConfig) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    config = replace(config, mixed_precision=loading.training_precision(config.mixed_precision))
    accelerator = fresh_accelerator(config.mixed_precision, unused_parameters=config.train_text_encoder)
    torch.manual_seed(config.seed)
    text = TextEncoderLora(config) if config.train_text_encoder else None
    token_ids = text.token_ids if text else None
    data = LatentCache(config.cache, token_ids)
    prior = LatentCache(config.class_cache, token_ids) if config.class_cache else None
    noise_scheduler = DDPMScheduler.from_pretrained(local_folder(config.base_model), subfolder="scheduler")
    unet = loading.load_unet(config.base_model)
    add_lora(unet, config)
    speedups.apply(unet, compile=config.compile, channels_last=config.channels_last)
    optimizer = make_optimizer(param_groups(unet, text, config), config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_steps)
    # The schedule is not handed to accelerate, which would step it once per process: it counts optimisation steps.
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if text:
        text.encoders = tuple(accelerator.prepare(e) for e in text.encoders)
    loras = lora_modules(accelerator.unwrap_model(unet), text, accelerator)
    # spent: seconds of the steps before start
    start, spent = resume(config.output, loras, optimizer, lr_scheduler, accelerator.scaler)
    last = min(config.stop_at_step or config.max_steps, config.max_steps)
    micro = config.gradient_accumulation_steps
    seed = config.seed + 1000 * accelerator.process_index  # each GPU of `accelerate launch` sees its own data
    batches = data.batches(config.batch_size, seed=seed, skip=start * micro)
    class_batches = prior.batches(config.batch_size, seed=seed + 1, skip=start * micro) if prior else None
    with training_run(config, enabled=accelerator.is_main_process) as mlflow_run:
        started, total = time.perf_counter(), spent
        for step in range(start + 1, last + 1):
            noise = step_randomness(seed, step)
            losses = []
            for _ in range(micro):
                batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
                class_batch = {k: v.to(accelerator.device) for k, v in next(class_batches).items()} if prior else None
                with accelerator.autocast():
                    loss = dreambooth_loss(unet, text, noise_scheduler, batch, class_batch, data.scaling_factor,
                                           noise, config)
                stop_if_not_finite(accelerator.reduce(loss.detach(), "sum"), step)  # every process stops together
                accelerator.backward(loss / micro)
                losses.append(loss.item())
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16's loss scaler skips steps that overflowed
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            mlflow_run.log_metrics({"loss": sum(losses) / micro, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if (step % config.checkpointing_steps == 0 or step == last) and accelerator.is_main_process:
                total = spent + time.perf_counter() - started  # the steps' seconds over all attempts
                mlflow_run.flush()  # first: a whole checkpoint's steps are in MLflow (or the spool), never lost
                save_checkpoint(loras, optimizer, lr_scheduler, config, step, mlflow_run.id, train_seconds=total,
                                scaler=accelerator.scaler)
            accelerator.wait_for_everyone()

        seconds, done = time.perf_counter() - started, last - start
        if done:  # a retry of a finished run trained nothing: its speed is the earlier attempts'
            mlflow_run.log_metrics({"images_per_second": done * micro * config.batch_size / max(seconds, 1e-9),
                                    **peak_memory()})
        # Seconds of the steps the weights have, over every attempt (each checkpoint carries its running total), so
        # a resumed or retried run neither counts a step twice nor reports only its own share.
        mlflow_run.log_metrics(cost(total, accelerator.num_processes, config.gpu_hour_price))
    return {"run_id": mlflow_run.id, "learning_rate": config.learning_rate, "resumed_from": start or None,
            "output": config.output, "stopped_at": last if last < config.max_steps else None,
            "train_seconds": total, "checkpoints": list_checkpoints(config.output)}


def fresh_accelerator(mixed_precision: str, unused_parameters: bool = False):
    """accelerate keeps one state per process and refuses a second Accelerator with another precision; start from a
    clean one so that `run` can be called again in one process (a notebook, the tests). The distributed part of the
    state (the process group of `accelerate launch`) is kept. `unused_parameters`: some trainable parameters get no
    gradient (text encoder 1's last layer: SDXL reads its penultimate hidden state), which DDP must be told of, as
    in the reference script, or it fails at the second step."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused_parameters else []
    return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers)


def add_lora(unet, config: TrainConfig) -> None:
    """Freeze the UNet, then add trainable LoRA adapters (by default on its attention projections, the reference
    script's targets, with its gaussian init). With mixed precision the frozen weights are stored in half precision
    (half the memory) while the LoRA weights stay fp32, as in the reference script."""
    from diffusers.training_utils import cast_training_params

    unet.requires_grad_(False)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    if half is not None:
        unet.to(dtype=half)
    unet.add_adapter(lora_config(config))
    cast_training_params(unet, dtype=torch.float32)
    unet.train()  # LoRA dropout acts only in train mode
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()


def lora_config(config: TrainConfig, target_modules: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha or config.rank, lora_dropout=config.lora_dropout,
                      init_lora_weights="gaussian", target_modules=list(target_modules or config.target_modules),
                      use_dora=config.dora)


class TextEncoderLora:
    """LoRA on both text encoders (the reference script's q/k/v/out projections). The cache's embeddings are then
    stale by definition, so each step encodes the captions' token ids again, with gradients."""

    TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

    def __init__(self, config: TrainConfig):
        self.tokenizers, self.encoders = loading.load_text_encoders(config.base_model)
        for encoder in self.encoders:
            encoder.add_adapter(lora_config(config, self.TARGETS))
            encoder.train()

    def token_ids(self, caption: str) -> dict[str, torch.Tensor]:
        return {f"input_ids_{i}": t(caption, padding="max_length", max_length=t.model_max_length, truncation=True,
                                    return_tensors="pt").input_ids[0] for i, t in enumerate(self.tokenizers)}

    def __call__(self, batch: dict) -> dict:
        hidden, pooled = [], None
        for i, encoder in enumerate(self.encoders):
            out = encoder(batch[f"input_ids_{i}"], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return {**batch, "prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def parameters(self) -> list:
        return [p for e in self.encoders for p in e.parameters() if p.requires_grad]


def param_groups(unet, text: TextEncoderLora | None, config: TrainConfig) -> list[dict]:
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": config.learning_rate}]
    if text:
        groups.append({"params": text.parameters(), "lr": config.text_encoder_lr or config.learning_rate})
    return groups


def lora_modules(unet, text: TextEncoderLora | None, accelerator) -> dict:
    """The models with adapters, by their name in diffusers' LoRA files."""
    modules = {"unet": unet}
    if text:
        modules |= {"text_encoder": accelerator.unwrap_model(text.encoders[0]),
                    "text_encoder_2": accelerator.unwrap_model(text.encoders[1])}
    return modules


def make_optimizer(params: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel for all LoRA tensors instead of a Python loop over a few hundred small ones (on the
    CPU that loop was a tenth of a tiny model's step). No 8-bit AdamW: a LoRA's optimizer state is small (SDXL's
    UNet at rank 4: 5.8 M parameters, 44 MB of fp32 moments; rank 32: 354 MB), so it would save 33 to 266 MB beside
    gigabytes of frozen weights and activations, for a CUDA-only dependency."""
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)


def dreambooth_loss(unet, text: TextEncoderLora | None, noise_scheduler, batch: dict, class_batch: dict | None,
                    scaling_factor: float, generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """The instance images' loss, plus `prior_loss_weight` times the class images' loss with prior preservation
    (in one UNet call when both batches have one shape, as in the reference script)."""
    def loss(b):
        return diffusion_loss(unet, noise_scheduler, text(b) if text else b, scaling_factor, generator, config)

    if class_batch is None:
        return loss(batch).mean()
    n = len(batch["latent_moments"])
    if batch["latent_moments"].shape[1:] == class_batch["latent_moments"].shape[1:]:
        per_image = loss({k: torch.cat([batch[k], class_batch[k]]) for k in batch})
        return per_image[:n].mean() + config.prior_loss_weight * per_image[n:].mean()
    return loss(batch).mean() + config.prior_loss_weight * loss(class_batch).mean()


def diffusion_loss(unet, noise_scheduler, batch: dict, scaling_factor: float, generator: torch.Generator,
                   config: TrainConfig) -> torch.Tensor:
    """The denoising objective at one random timestep per image; one loss per image."""
    mean, logvar = batch["latent_moments"].chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    latents = (mean + std * randn_like(mean, generator)) * scaling_factor
    noise = randn_like(latents, generator)
    if config.noise_offset:  # a per-channel shift, so the model learns to move the mean brightness
        noise = noise + config.noise_offset * randn_like(noise[:, :, :1, :1], generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, batch["prompt_embeds"],
                      added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]},
                      ).sample
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma is None:
        return per_image
    return per_image * min_snr_weights(noise_scheduler, timesteps, config.snr_gamma, v_prediction)


def min_snr_weights(noise_scheduler, timesteps, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023): easy, low-noise timesteps stop dominating the loss."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if v_prediction else snr)


def step_randomness(seed: int, step: int) -> torch.Generator:
    """A step's noise, timesteps and latent samples come from this generator, its LoRA dropout from torch's global
    one, both seeded from (seed, step) alone: a resumed run needs no saved random state to draw what the
    uninterrupted run drew, and each process of a multi-GPU run (its own seed) draws its own."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "big") >> 1
    torch.manual_seed(derived)
    return torch.Generator().manual_seed(derived)


def randn_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same noise on every device.
    return torch.randn(tensor.shape, generator=generator).to(tensor.device, tensor.dtype)


def stop_if_not_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise StepError(f"loss is {loss.item()} at step {step}: training diverged (lower the learning rate)")


def save_checkpoint(loras: dict, optimizer, lr_scheduler, config: TrainConfig, step: int, run_id: str,
                    train_seconds: float = 0.0, scaler=None) -> None:
    """Write checkpoint-<step>/ atomically (a killed run never leaves a half checkpoint that looks whole):
    the LoRA in diffusers and kohya/ComfyUI formats, what it was trained from, and the state to resume from."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    states = {name: get_peft_model_state_dict(module) for name, module in loras.items()}
    metadata = {"unet": adapter_metadata(lora_config(config)),
                "text_encoder": adapter_metadata(lora_config(config, TextEncoderLora.TARGETS))}
    with write_dir(join(config.output, f"checkpoint-{step}")) as out:
        StableDiffusionXLPipeline.save_lora_weights(
            out, safe_serialization=True,
            **{f"{name}_lora_layers": convert_state_dict_to_diffusers(state) for name, state in states.items()},
            **{f"{name}_lora_adapter_metadata": metadata["unet" if name == "unet" else "text_encoder"]
               for name in states})
        kohya_file = kohya.write(out, states, config.lora_alpha or config.rank, config.dora)
        write_json(out / CHECKPOINT_INFO, {"step": step, "learning_rate": config.learning_rate, "run_id": run_id,
                                           "base_model": config.base_model, "cache": config.cache,
                                           "rank": config.rank, "text_encoder": config.train_text_encoder,
                                           "train_seconds": train_seconds, "gpus": gpus_in_use(),
                                           "kohya": kohya_file})
        training_state.save(out, {"step": step, "lora": states, "optimizer": optimizer.state_dict(),
                                  "lr_scheduler": lr_scheduler.state_dict(),  # fp16's loss scaler, on a GPU
                                  "scaler": scaler.state_dict() if scaler is not None else None})
    limit_checkpoints(config.output, config.checkpoints_total_limit)


def list_checkpoints(output: str, report_incomplete: bool = False) -> list[dict]:
    """Whole checkpoints under `output`, oldest first. One whose writer was killed, or that lost a file since, is
    left out (training writes it again when it reaches its step)."""
    steps = sorted(int(name.removeprefix("checkpoint-")) for name in list_dir(output)
                   if re.fullmatch(r"checkpoint-\d+", name))
    whole = []
    for step in steps:
        uri = join(output, f"checkpoint-{step}")
        problem = why_not_whole(uri)
        if problem is None:
            whole.append({"step": step, "uri": uri})
        elif report_incomplete:
            print(f"warning: {uri} is incomplete ({problem}): not resumed from", file=sys.stderr)
    return whole


def limit_checkpoints(output: str, limit: int | None) -> None:
    if limit:
        for old in list_checkpoints(output)[:-limit]:
            remove(old["uri"])


def resume(output: str, loras: dict, optimizer, lr_scheduler, scaler=None) -> tuple[int, float]:
    """Load the latest checkpoint's state, if any; return the step it was taken at (0 for a fresh start) and the
    training seconds its steps took."""
    checkpoints = list_checkpoints(output, report_incomplete=True)
    if not checkpoints:
        return 0, 0.0
    latest = checkpoints[-1]
    step = training_state.restore(read_dir(latest["uri"], whole=True), latest["uri"], loras, optimizer, lr_scheduler,
                                  scaler)
    print(f"resuming from {latest['uri']}", file=sys.stderr)
    return step, read_json(f"{latest['uri']}/{CHECKPOINT_INFO}").get("train_seconds", 0.0)
