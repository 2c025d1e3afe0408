"""The step CLI: `python -m sd_tasks <step> [--flags] [--config FILE]`.

Every step is a plain function `run(config) -> dict` whose single parameter is a dataclass. This module turns that
dataclass into argparse flags (field name `max_steps` becomes `--max-steps`, its type and help come from the
annotation and `field(metadata={"help": ...})`), merges an optional JSON/YAML config file under the flags, runs the
step and prints its result as one JSON line, last on stdout. That line is the whole contract with Airflow: the same
argv runs as a local subprocess or as a Kubernetes pod.

Failures end with one line on stderr, `error: <step>: <reason>`, and an exit code that says whether running the
step again could help: 65 (sysexits' EX_DATAERR) for a `StepError` (bad input, or a run that cannot succeed as
asked, like a diverging learning rate: final), 2 for bad arguments (argparse's; final), 1 for an `IncompleteFolder`
(an input whose writer was stopped: its retry rewrites it), for `Unavailable` (the tracking server or S3 down, a
full disk: one line too, and a retry once it is back resumes) and for anything else (a bug or the environment, as for
any uncaught Python exception: its traceback goes first, and a retry may succeed), 130 when interrupted. The final
codes are distinct from 1 on purpose: 1 is also what Python, torchrun and `accelerate launch` return for any
failure, so it must mean "maybe retry".
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import os
import signal
import sys
import time
import traceback
import types
import typing
from pathlib import Path

from sd_tasks.core.config import BOUNDS, bounds
from sd_tasks.core.cost import record_step
from sd_tasks.core.errors import IncompleteFolder, StepError, Unavailable
from sd_tasks.core.redact import redact
from sd_tasks.core.storage import check_output, is_remote

# step name -> ("module[:function]", one-line description); the function defaults to `run`. Modules import lazily,
# so `validate` never pays for torch. A step's module lives in its stage's package (docs/architecture.md).
STEPS: dict[str, tuple[str, str]] = {
    "tiny-model": ("sd_tasks.models.tiny_model", "write a random-weight SDXL pipeline and evaluators for offline runs"),
    "publish-dataset": ("sd_tasks.data.dataset:publish", "add a folder of images to a DVC data registry as a new version"),
    "pin-models": ("sd_tasks.models.model_refs", "resolve every hub model to a commit (id@sha) and fetch it into the cache"),
    "dataset": ("sd_tasks.data.dataset", "resolve a DVC dataset version to files and a content hash"),
    "validate": ("sd_tasks.data.validate", "decode every image, reject the unusable, report why"),
    "caption": ("sd_tasks.data.caption", "attach a caption to every accepted image"),
    "resize": ("sd_tasks.data.resize", "resize and crop to the training resolution, record SDXL micro-conditioning"),
    "encode": ("sd_tasks.data.encode", "encode VAE latents and both SDXL text encoders into a cache (or one shard)"),
    "merge-cache": ("sd_tasks.data.encode:merge", "join the shards of an encode cache into one manifest"),
    "class-images": ("sd_tasks.data.class_images", "generate (or find cached) class images for prior preservation"),
    "start-run": ("sd_tasks.core.tracking", "open (or reopen) the MLflow parent run of a pipeline run"),
    "end-run": ("sd_tasks.core.tracking:end", "close an MLflow parent run left RUNNING by a failed pipeline run"),
    "train": ("sd_tasks.training.train", "train DreamBooth-LoRA on the encode cache, checkpoint every N steps"),
    "evaluate": ("sd_tasks.evaluation.evaluate", "generate fixed-seed images for a checkpoint and score them"),
    "halve": ("sd_tasks.evaluation.halving", "successive halving: keep the best learning rates at a rung, stop the rest"),
    "select": ("sd_tasks.evaluation.select", "score every evaluated checkpoint and pick the best"),
    "lineage": ("sd_tasks.registry.lineage", "say whether anything changed since the champion or challenger was trained"),
    "champion": ("sd_tasks.registry.register:champion", "fetch the current champion's LoRA for re-evaluation"),
    "register": ("sd_tasks.registry.register", "register the selected LoRA; promote it to champion only if it is better"),
    "promote": ("sd_tasks.registry.promotion:promote", "make an approved version champion, recording who approved it"),
    "rollback": ("sd_tasks.registry.promotion:rollback", "put an earlier version back as champion, recording who and why"),
    "serve": ("sd_tasks.serving.server", "serve each subject's champion LoRA over HTTP (the image API) until stopped"),
    "generate": ("sd_tasks.serving.batch", "render one prompt at every seed with a registered LoRA (a batch's task)"),
    "batch-report": ("sd_tasks.serving.batch:report", "log a batch's images to MLflow: a grid of prompts x seeds"),
}

EXIT_REFUSED, EXIT_USAGE, EXIT_CRASHED, EXIT_INTERRUPTED = 65, 2, 1, 130
FINAL_EXIT_CODES = frozenset({EXIT_REFUSED, EXIT_USAGE})  # running the step again would fail the same way
RESULT_FILE_ENV = "SD_TASKS_RESULT_FILE"  # also write the result here (a pod's /airflow/xcom/return.json)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    step = argv.pop(0)
    if step not in STEPS:
        print(f"error: unknown step {step!r}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return EXIT_USAGE
    started = time.perf_counter()
    code = _main(step, argv)
    record_step(step, time.perf_counter() - started, code)  # this try's seconds, for the night's cost (sd_tasks.core.cost)
    return code


def _main(step: str, argv: list[str]) -> int:
    module_name, _, func_name = STEPS[step][0].partition(":")
    func = getattr(importlib.import_module(module_name), func_name or "run")
    config_type = _config_type(func)
    parser = build_parser(step, config_type)
    args = parser.parse_args(argv)
    # Airflow stops a task with SIGTERM: turn it into an exception so `with` blocks (MLflow runs, staging
    # folders) close properly instead of leaving RUNNING runs and temp folders behind.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        config = make_config(config_type, args, parser)
        check_outputs(config)
        result = func(config)
    except StepError as exc:
        print(redact(f"error: {step}: {exc}"), file=sys.stderr)
        return EXIT_REFUSED
    except (IncompleteFolder, Unavailable) as exc:  # a writer was stopped, a service is down: a retry can help
        print(redact(f"error: {step}: {exc}"), file=sys.stderr)
        return EXIT_CRASHED
    except KeyboardInterrupt:
        print(f"error: {step}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not bad input: keep the traceback for the log, then the one line
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
        print(redact(f"error: {step}: {type(exc).__name__}: {exc}".splitlines()[0]), file=sys.stderr)
        return EXIT_CRASHED
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one of several processes under `accelerate launch`/torchrun: the main process reports
    line = redact(json.dumps(result, sort_keys=True, default=str))  # a URL's credentials never reach XCom or logs
    if os.environ.get(RESULT_FILE_ENV):
        Path(os.environ[RESULT_FILE_ENV]).parent.mkdir(parents=True, exist_ok=True)
        Path(os.environ[RESULT_FILE_ENV]).write_text(line)
    sys.stdout.flush()
    print(line, flush=True)
    return 0


OUTPUTS = ("output", "evaluators")  # the options a step writes a folder to


def check_outputs(config) -> None:
    """Before any work: an output folder that is, contains or lies inside one of the step's inputs (any other option
    naming an existing path or a storage URI) is refused (sd_tasks.core.storage.check_output): `validate --output` naming
    the photos' folder would otherwise replace the photos."""
    inputs = [value for f in dataclasses.fields(config) if f.name not in OUTPUTS
              for value in _paths(getattr(config, f.name))]
    for name in OUTPUTS:
        if isinstance(output := getattr(config, name, None), str) and output:
            check_output(output, inputs, f"--{name.replace('_', '-')}")


def _paths(value) -> list[str]:
    """The local paths that exist and the storage URIs among an option's values (NAME=SOURCE: its SOURCE)."""
    found = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if not isinstance(item, str) or not item:
            continue
        for candidate in {item, item.partition("=")[2]} - {""}:
            if (is_remote(candidate) and not candidate.startswith(("http://", "https://", "git@", "ssh://"))) or \
                    (not is_remote(candidate) and os.path.lexists(os.path.expanduser(candidate))):
                found.append(candidate)
    return found


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _usage() -> str:
    width = max(map(len, STEPS))
    lines = ["usage: python -m sd_tasks <step> [--help] [--config FILE] [--flag VALUE ...]", "", "steps:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STEPS.items()]
    return "\n".join(lines)


def _config_type(func) -> type:
    hints = typing.get_type_hints(func)
    params = list(inspect.signature(func).parameters)
    return hints[params[0]]


def build_parser(step: str, config_type: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m sd_tasks {step}",
        description=(config_type.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of settings; flags override it")
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        kind, is_list = _scalar_type(hints[f.name])
        names = [f.name] if f.metadata.get("positional") else ["--" + f.name.replace("_", "-")]
        kwargs: dict = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if f.metadata.get("positional"):
            kwargs["nargs"] = "?"  # may also come from --config
        else:
            kwargs["dest"] = f.name
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if not f.metadata.get("positional"):
                kwargs["metavar"] = f.metadata.get("metavar", kind.__name__.upper())
            if is_list:  # `--prompts a b` or `--prompts=a --prompts=b` (the form Airflow passes)
                kwargs["nargs"], kwargs["action"] = "+", "extend"
        if said := _said(bounds(f)):
            kwargs["help"] += f" ({said})"
        if _required(f):
            kwargs["help"] += " (required)"
        else:
            kwargs["help"] += f" (default: {_default(f)!r})"
        parser.add_argument(*names, **kwargs)
    return parser


def make_config(config_type: type, args: argparse.Namespace, parser: argparse.ArgumentParser):
    values: dict = {}
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    if args.config:
        hints = typing.get_type_hints(config_type)
        values.update({name: _converted(args.config, name, value, hints[name], fields[name])
                       if name in fields else value for name, value in _read_config_file(args.config).items()})
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    names = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise StepError(f"{args.config}: unknown settings {', '.join(unknown)}")
    missing = [f.name for f in dataclasses.fields(config_type) if _required(f) and f.name not in values]
    if missing:
        parser.error("missing " + ", ".join(_flag(f) for f in dataclasses.fields(config_type) if f.name in missing))
    config = config_type(**values)
    check_bounds(config)
    return config


def check_bounds(config) -> None:
    """Every number finite and within its option's bounds, before any work; one line naming the flag otherwise (a
    zero batch size, a negative step count or a NaN learning rate would fail late, or worse, not at all)."""
    for f in dataclasses.fields(config):
        value, limits = getattr(config, f.name), bounds(f)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item) or not all(BOUNDS[k](item, bound) for k, bound in limits.items()):
                raise StepError(f"{_flag(f)} {item!r}: {_said(limits) or 'a finite number'}")


def _said(bounds: dict) -> str:
    """`at least 1 and at most 100000`, from an option's bounds."""
    return " and ".join(f"{key.replace('_', ' ')} {bound:g}" if isinstance(bound, float) else
                        f"{key.replace('_', ' ')} {bound}" for key, bound in bounds.items())


def _read_config_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise StepError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise StepError(f"{path}: not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'} ({exc})") from None
    if not isinstance(data, dict):
        raise StepError(f"{path}: config file must hold a mapping of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _converted(path: str, name: str, value, hint, f: dataclasses.Field):
    """A config file's value as the setting's type, by the flags' rules (YAML 1.1 reads `1e-4` as a string, and
    a list may be given as one item); a value that does not convert is refused, naming the file and the setting."""
    kind, is_list = _scalar_type(hint)
    if value is None:
        if not _required(f) and _default(f) is None:
            return None
        raise StepError(f"{path}: {name}: null is not a {'list' if is_list else kind.__name__}")
    if is_list:
        return [_converted_item(path, name, item, kind) for item in (value if isinstance(value, list) else [value])]
    return _converted_item(path, name, value, kind)


def _converted_item(path: str, name: str, value, kind: type):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise StepError(f"{path}: {name}: {value!r} is not true or false")
    if kind is str:
        if isinstance(value, (bool, float)):  # `1.10` became 1.1, `yes` became True
            raise StepError(f"{path}: {name}: {value!r} is a {'number' if isinstance(value, float) else 'boolean'}, "
                            f"not text (quote it)")
        if isinstance(value, (str, int)):
            return str(value)
    elif kind in (int, float) and not isinstance(value, (bool, list, dict)):
        if isinstance(value, kind) or (kind is float and isinstance(value, int)):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    raise StepError(f"{path}: {name}: {value!r} is not a{'n' if kind is int else ''} {kind.__name__}")


def _scalar_type(hint) -> tuple[type, bool]:
    """(element type, is a list) for str, int, float, bool, X | None and list[X]."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _flag(f: dataclasses.Field) -> str:
    return f.name.upper() if f.metadata.get("positional") else "--" + f.name.replace("_", "-")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()

