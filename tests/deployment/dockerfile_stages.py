"""The Dockerfile read as BuildKit reads it (the `dockerfile` package wraps BuildKit's own parser): its stages, their
bases and instructions, for tests/deployment/test_images.py and test_image_packages.py."""
from __future__ import annotations

import re
from dataclasses import dataclass

import dockerfile

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
TARGETS = ("airflow", "mlflow", "worker")
CODE_DIRS = ("dags/", "plugins/", "sd_tasks/")
ML_STACK = {"torch", "diffusers", "transformers", "accelerate", "peft", "mlflow", "dvc", "safetensors"}


@dataclass
class Stage:
    name: str
    base: str  # an image reference, or the name of an earlier stage
    instructions: list


def parse_stages() -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name), from BuildKit's own Dockerfile parser."""
    global_args, stages, current = {}, {}, None
    for instruction in dockerfile.parse_file(str(DOCKERFILE)):
        if instruction.cmd == "FROM":
            base, _, name = instruction.value
            current = stages[name] = Stage(name, base, [])
        elif current is None and instruction.cmd == "ARG":
            key, _, default = instruction.value[0].partition("=")
            global_args[key] = default
        else:
            current.instructions.append(instruction)
    return global_args, stages


GLOBAL_ARGS, STAGES = parse_stages()


def chain(target: str) -> list:
    """The instructions that make a target: its stage's, after those of the stages it is built FROM."""
    stage = STAGES[target]
    return (chain(stage.base) if stage.base in STAGES else []) + stage.instructions


def instructions(target: str, cmd: str) -> list:
    return [i for i in chain(target) if i.cmd == cmd]


def pairs(instruction) -> dict[str, str]:
    """KEY value pairs of an ENV or LABEL instruction, quotes removed."""
    values = instruction.value
    return {values[i]: values[i + 1].strip('"') for i in range(0, len(values), 2)}


def env_of(target: str) -> dict[str, str]:
    env = {}
    for instruction in instructions(target, "ENV"):
        env.update(pairs(instruction))
    return env


def base_image(target: str) -> str:
    stage = STAGES[target]
    while stage.base in STAGES:
        stage = STAGES[stage.base]
    return re.sub(r"\$\{(\w+)\}", lambda m: GLOBAL_ARGS[m[1]], stage.base)
