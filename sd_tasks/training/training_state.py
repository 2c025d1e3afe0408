"""The state a checkpoint resumes from (LoRA, optimizer, schedule, fp16 loss scaler), stored without a pickle.

Unpickling runs whatever code the file names, and a checkpoint lives in a bucket that more hands than the trainer's
can write to; so the tensors go to a safetensors file and everything else (step, hyper-parameters, the schedule's
counters) to JSON that only describes where each tensor sits. Loading rebuilds the nested dicts and lists that
torch's `state_dict`s are. A checkpoint whose state is only an old pickle is refused by name, never opened.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sd_tasks.core.errors import StepError
from sd_tasks.training.checkpoint_files import PICKLED_TRAINING_STATE, TRAINING_STATE, TRAINING_STATE_INFO


def save(folder: Path, state: dict) -> None:
    """Write `state` (nested dicts, lists, tuples, numbers, strings, None and tensors) into `folder`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    save_file(tensors, folder / TRAINING_STATE)
    (folder / TRAINING_STATE_INFO).write_text(json.dumps(skeleton))


def load(folder: Path, uri: str) -> dict:
    """The state `save` wrote to `folder` (a local copy of the checkpoint at `uri`, which errors name)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (folder / TRAINING_STATE).exists() and (folder / PICKLED_TRAINING_STATE).exists():
        raise StepError(f"{uri}/{PICKLED_TRAINING_STATE}: a pickled training state (from a Dreamline before "
                        f"{TRAINING_STATE}) is never loaded, as unpickling can run any code; remove {uri} to resume "
                        f"from an earlier checkpoint or start again")
    try:
        tensors = load_file(folder / TRAINING_STATE)
    except (SafetensorError, OSError) as exc:
        raise StepError(f"{uri}/{TRAINING_STATE}: not a readable safetensors file ({exc})") from None
    try:
        return _join(json.loads((folder / TRAINING_STATE_INFO).read_text()), tensors)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise StepError(f"{uri}/{TRAINING_STATE_INFO}: not the training state's description ({exc!r})") from None


def _split(value, path: str, tensors: dict) -> object:
    """JSON for `value`, its tensors moved into `tensors` under their path. Containers are tagged (a dict's keys
    may be ints, as an optimizer's state is keyed by parameter index); numbers, strings and None stay as they are."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"{path}: keys {list(value)} cannot be stored without a pickle")
        return {"dict": [[k, _split(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path}: a {type(value).__name__} cannot be stored without a pickle")


def _join(value, tensors: dict) -> object:
    if not isinstance(value, dict):
        return value
    [(tag, content)] = value.items()
    if tag == "tensor":
        return tensors[content]
    if tag == "dict":
        return {k: _join(v, tensors) for k, v in content}
    if tag == "list":
        return [_join(v, tensors) for v in content]
    if tag == "tuple":
        return tuple(_join(v, tensors) for v in content)
    raise ValueError(f"unknown entry {tag!r}")


def restore(folder: Path, uri: str, loras: dict, optimizer, lr_scheduler, scaler=None) -> int:
    """Load the state in `folder` into the run's LoRA modules (by diffusers name), optimizer, schedule and fp16
    loss scaler; return its step. A state that does not fit this run (another rank, targets or text-encoder
    setting) is refused by name: peft would load the layers that match and leave the rest as initialised."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state = load(folder, uri)
    try:
        for name, module in loras.items():
            expected, saved = get_peft_model_state_dict(module), state["lora"][name]
            if saved.keys() != expected.keys() or any(saved[k].shape != expected[k].shape for k in saved):
                raise ValueError(f"its {name} LoRA has other layers or shapes than this run's")
            set_peft_model_state_dict(module, saved)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        return int(state["step"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise StepError(f"{uri}/{TRAINING_STATE}: does not fit this run ({reason})") from None
