"""Checks a LoRA file in diffusers' format before anything loads or registers it.

What arrives as a checkpoint or a champion may have been written by anyone with access to the bucket or the
registry: a pickle under a .safetensors name, keys for layers the base model lacks (diffusers warns and loads the
rest, so the "LoRA" would be scored as the base model), or shapes that fail deep inside peft or allocate without
bound. `check` reads only the safetensors header (names, dtypes, shapes and the adapter metadata), never the
tensors, and needs no torch, so the light steps (register, champion) stay light; `evaluate`, which builds the
pipeline anyway, also compares every shape with the base model's layers (`base_layers`).

A LoRA trained on the text encoders too (`train --train-text-encoder`) has their A and B under diffusers' own names
for them (`lora_linear_layer.down` and `.up`), which it converts back to peft's on loading.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from sd_tasks.core.errors import StepError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = COMPONENTS[1:]
DOWN = ("lora.down.weight", "lora_A.weight")  # diffusers' names for A (rank, in), as written and as peft's
UP = ("lora.up.weight", "lora_B.weight")  # B (out, rank)
TEXT_DOWN = ("lora_linear_layer.down.weight",)  # and a text encoder's, as save_lora_weights writes them
TEXT_UP = ("lora_linear_layer.up.weight",)
MAGNITUDE = ("lora_magnitude_vector", "lora_magnitude_vector.weight")  # DoRA: one per output
FLOATS = ("F16", "BF16", "F32", "F64")
MAX_METADATA_BYTES = 1 << 20
PARTS = {"down": "A (down)", "up": "B (up)", "magnitude": "DoRA magnitude"}


def check(path: Path, shown: str, layers: dict[str, tuple[int, int]] | None = None) -> None:
    """Raise a StepError naming `shown` (the file's URI) unless `path` is a safetensors file holding only LoRA
    weights of the SDXL components: per layer A (rank, in) and B (out, rank) of one rank, at most min(in, out), and
    optionally DoRA magnitudes (out). With `layers` ({"unet.<module>": (in, out)} of the base model's Linear and
    Conv2d layers) each layer must be one of them, with its sizes."""
    header, metadata = _read_header(path, shown)
    if not header:
        raise StepError(f"{shown}: holds no LoRA weights")
    found: dict[str, dict[str, tuple]] = {}
    for key, (dtype, shape) in header.items():
        layer, part = _split_key(key)
        if layer is None:
            raise StepError(f"{shown}: unexpected key {key!r} (not a LoRA weight of {', '.join(COMPONENTS)})")
        if dtype not in FLOATS:
            raise StepError(f"{shown}: {key} holds {dtype}, not floating-point weights")
        layer = _base_name(layer, layers)
        if part in found.setdefault(layer, {}):  # one would be loaded over the other
            raise StepError(f"{shown}: {layer} has two {PARTS[part]} matrices (one is {key})")
        found[layer][part] = shape
    ranks = {layer: _check_layer(layer, parts, shown, layers) for layer, parts in found.items()}
    _check_metadata(metadata, ranks, shown)


def _read_header(path: Path, shown: str) -> tuple[dict[str, tuple[str, tuple]], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            return header, f.metadata() or {}
    except FileNotFoundError:
        raise StepError(f"{shown}: no such file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise StepError(f"{shown}: not a safetensors file ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None


def _split_key(key: str) -> tuple[str | None, str | None]:
    """("<component>.<module>", "down" | "up" | "magnitude"), or (None, None) for anything else."""
    component = key.split(".", 1)[0]
    if component not in COMPONENTS:
        return None, None
    text = component in TEXT_ENCODERS  # diffusers converts `lora_linear_layer` for the text encoders alone
    for part, suffixes in (("down", DOWN + TEXT_DOWN * text), ("up", UP + TEXT_UP * text), ("magnitude", MAGNITUDE)):
        for suffix in suffixes:
            module = key[len(component) + 1:-len(suffix) - 1] if key.endswith("." + suffix) else ""
            if module and "" not in module.split("."):
                return f"{component}.{module}", part
    return None, None


def _base_name(layer: str, layers: dict | None) -> str:
    """The base model's name of a LoRA file's layer. transformers 5's CLIPTextModel has no `text_model` level, which
    LoRA files written with earlier versions still name; diffusers drops it when the text encoder lacks it."""
    component, module = layer.split(".", 1)
    if layers is None or layer in layers or component not in TEXT_ENCODERS or not module.startswith("text_model."):
        return layer
    return f"{component}.{module.removeprefix('text_model.')}"


def _check_layer(layer: str, parts: dict[str, tuple], shown: str, layers: dict | None) -> int:
    """The layer's rank, once its shapes are known to fit together (and the base model's layer)."""
    down, up = parts.get("down"), parts.get("up")
    if down is None or up is None:
        raise StepError(f"{shown}: {layer} has {'no A (down)' if down is None else 'no B (up)'} matrix")
    if len(down) not in (2, 4) or len(up) != len(down) or any(d != 1 for d in up[2:]):
        raise StepError(f"{shown}: {layer} has matrices of shapes {list(down)} and {list(up)}, not a LoRA's")
    rank, fan_in, fan_out = down[0], down[1], up[0]
    if up[1] != rank or not 1 <= rank <= min(fan_in, fan_out):
        raise StepError(f"{shown}: {layer} has A {list(down)} and B {list(up)}: not one rank between 1 and "
                        f"min(in, out)")
    magnitude = parts.get("magnitude")
    if magnitude is not None and math.prod(magnitude) != fan_out:
        raise StepError(f"{shown}: {layer} has a DoRA magnitude of shape {list(magnitude)}, not {fan_out} values")
    if layers is not None:
        if layer not in layers:
            raise StepError(f"{shown}: {layer} is not a Linear or Conv2d layer of the base model")
        if (fan_in, fan_out) != layers[layer]:
            raise StepError(f"{shown}: {layer} maps {fan_in} inputs to {fan_out} outputs; the base model's layer "
                            f"maps {layers[layer][0]} to {layers[layer][1]}")
    return rank


def _check_metadata(metadata: dict, ranks: dict[str, int], shown: str) -> None:
    """diffusers builds the adapters from the `lora_adapter_metadata` config when the file has one: its rank must
    be the tensors' (a rank pattern may give layers their own)."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return
    try:
        config = json.loads(raw) if len(raw) <= MAX_METADATA_BYTES else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise StepError(f"{shown}: its lora_adapter_metadata is not a JSON object of at most 1 MiB")
    for component in COMPONENTS:
        r, alpha = config.get(f"{component}.r"), config.get(f"{component}.lora_alpha")
        if r is None or config.get(f"{component}.rank_pattern"):
            continue
        used = {rank for layer, rank in ranks.items() if layer.split(".", 1)[0] == component}
        if not isinstance(r, int) or used - {r}:
            raise StepError(f"{shown}: its metadata says rank {r!r} for {component}, its weights have rank "
                            f"{sorted(used)}")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise StepError(f"{shown}: its metadata's lora_alpha for {component} is {alpha!r}, not a positive number")


def layout(path: Path) -> frozenset[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LoRA file (already `check`ed) with its shape, from the header alone: two files of one
    layout fit the same adapters (what hot-swapping needs)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return frozenset((key, tuple(f.get_slice(key).get_shape())) for key in f.keys())


def components(path: Path) -> set[str]:
    """The SDXL components a LoRA file (already `check`ed) holds weights for, from its header alone."""
    return {key.split(".", 1)[0] for key, _ in layout(path)}


def base_layers(base_model: str) -> dict[str, tuple[int, int]]:
    """{"<component>.<module>": (in, out)} of every Linear and Conv2d of the SDXL pipeline `base_model`, from its
    configs alone: the models are built on the meta device, no weights read."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_tasks.models.model_refs import local_folder

    base_model = local_folder(base_model)
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base_model, subfolder="unet")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(base_model, subfolder="text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(base_model, subfolder="text_encoder_2")),
        }
    layers = {}
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                layers[f"{component}.{name}"] = (module.in_features, module.out_features)
            elif isinstance(module, torch.nn.Conv2d):
                layers[f"{component}.{name}"] = (module.in_channels, module.out_channels)
    return layers


def check_checkpoints(uris: list[str], base_model: str | None = None) -> None:
    """`check` the LoRA file of each checkpoint folder; against the base model's layers when one is given."""
    from sd_tasks.core.storage import read_dir
    from sd_tasks.training.checkpoint_files import LORA_WEIGHTS

    layers = base_layers(base_model) if base_model else None
    for uri in uris:
        check(read_dir(uri) / LORA_WEIGHTS, f"{uri}/{LORA_WEIGHTS}", layers)
