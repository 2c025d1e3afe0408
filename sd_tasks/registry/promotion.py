"""Move a registered model's `champion` alias, and keep a record of who moved it, when and why.

An alias in the MLflow Model Registry says only where it points now. Serving loads `models:/<name>@champion`, so
when a champion turns out bad (it draws the wrong dog) somebody must be able to put the previous one back at once,
and the next person to look must see that it happened and why. `move_champion` is the one way the alias moves:

- the alias `champion` is set on the version;
- that version gets the tags `champion.action` ("promoted", "approved" or "rolled back"), `champion.by`,
  `champion.reason`, `champion.at` (ISO UTC) and `champion.previous` (the version it replaced, or "none"): they
  describe the latest move to it, and a later move to the same version overwrites them;
- the registered model's description gains one line under `## Champion history` (the heading is added when
  missing; text before it is kept; newest line last), e.g.
  `- 2026-11-23T20:15:00Z: v2 -> v1, rolled back by alice: v2 draws the wrong dog`. MLflow keeps at most 5000
  characters of description, so the oldest history lines go first when it would not fit (each version's tags
  still say how it last became champion).

Moving the alias to the version that already holds it changes and records nothing, so a retried task is harmless.
The alias moves first and the record follows: a failure in between leaves the right champion with a missing line,
never a line for a move that did not happen.

Three steps use it: `register` (an automatic promotion), `rollback` (a person puts an earlier version back) and
`promote` (the DAG's path after a reviewer approves a challenger in Airflow).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from sd_tasks.core import tracking
from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import write_dir, write_json

CHAMPION = "champion"  # the alias serving loads; sd_tasks.registry.register imports it from here
ACTIONS = ("promoted", "approved", "rolled back")
HISTORY = "## Champion history"
MAX_DESCRIPTION = 5000  # MLflow's registered model description column (varchar(5000) on PostgreSQL)
MAX_REASON = 500  # characters of a reason kept in the record
DROPPED = "- (older lines dropped to fit MLflow's description limit; each version's champion.* tags remain)"


def move_champion(client, model_name: str, version: str | int, *, by: str, reason: str, action: str) -> dict:
    """Point `champion` at `version` and record the move (see the module docstring).

    Returns {model_name, version, previous, action, by, reason, at, changed}; `previous` is the replaced version
    (an int) or None, and `changed` is False when `version` already was the champion (then nothing is written).
    """
    if action not in ACTIONS:
        raise ValueError(f"action {action!r}: one of {', '.join(ACTIONS)}")
    reason, by = one_line(reason, MAX_REASON), one_line(by, 100) or "unknown"
    if not reason:
        raise StepError(f"model {model_name!r} version {version}: a reason is required to move {CHAMPION}")
    version = str(version)
    current = client.get_registered_model(model_name).aliases.get(CHAMPION)
    previous = None if current is None else int(current)
    at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = {"model_name": model_name, "version": int(version), "previous": previous, "action": action, "by": by,
              "reason": reason, "at": at, "changed": previous != int(version)}
    if not result["changed"]:
        return result
    client.set_registered_model_alias(model_name, CHAMPION, version)
    tags = {"action": action, "by": by, "reason": reason, "at": at,
            "previous": "none" if previous is None else str(previous)}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, f"{CHAMPION}.{key}", value)
    line = f"- {at}: {'none' if previous is None else f'v{previous}'} -> v{version}, {action} by {by}: {reason}"
    description = client.get_registered_model(model_name).description or ""
    client.update_registered_model(model_name, description=with_history_line(description, line))
    return result


def with_history_line(description: str, line: str, limit: int = MAX_DESCRIPTION) -> str:
    """`description` with `line` appended to its champion history section (made when absent), within `limit`."""
    lines = description.rstrip("\n").split("\n") if description.strip() else []
    if HISTORY in lines:
        start = lines.index(HISTORY) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    else:
        lines += [""] * bool(lines) + [HISTORY]
        start = end = len(lines)
    head, history, tail = lines[:start], [x for x in lines[start:end] if x.strip()], lines[end:]
    dropped = DROPPED in history  # lines were dropped before: keep saying so
    history = [x for x in history if x != DROPPED] + [line]
    while True:
        text = "\n".join(head + [DROPPED] * dropped + history + [""] * bool(tail) + tail) + "\n"
        if len(text) <= limit or len(history) == 1:
            return text[:limit]
        history, dropped = history[1:], True


def one_line(text: str, limit: int) -> str:
    text = re.sub(r"\s+", " ", text or "").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_version(client, model_name: str, version: int) -> None:
    """Refuse, in one line, a model or version that is not registered (or whose registration did not finish)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "INVALID_PARAMETER_VALUE":  # a name MLflow cannot hold ('/', ':'): one line
            raise StepError(f"model {model_name!r}: {str(exc).splitlines()[0]}") from None
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise StepError(f"model {model_name!r} is not registered") from None
    try:
        found = client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise StepError(f"model {model_name!r} has no version {version}") from None
    if found.status != "READY":
        raise StepError(f"model {model_name!r} version {version}: registration is {found.status}, not READY")
    if found.tags.get("score.broken") == "true":  # register's tag: its images were not finite
        raise StepError(f"model {model_name!r} version {version}: its images were not finite (a diverged LoRA); "
                        f"it cannot be champion")


def check_still_champion(client, model_name: str, version: int, compared_with: int) -> None:
    """Refuse an approval whose evidence is stale: `champion` no longer points where it did when `version` was
    compared with it (0: it pointed nowhere)."""
    current = client.get_registered_model(model_name).aliases.get(CHAMPION)
    now = int(current) if current is not None else 0
    if now not in (compared_with, int(version)):
        then = f"v{compared_with}" if compared_with else "none"
        raise StepError(f"model {model_name!r}: champion is {f'v{now}' if now else 'none'} now, {then} when version "
                        f"{version} was compared with it (moved during the approval wait): not promoted; a forced "
                        f"run compares again, or `rollback --version {version}` makes it champion by hand")


@dataclass
class RollbackConfig:
    """Put an earlier version back as champion, recording who did it and why in the registry."""

    model_name: str = option("registered model name, e.g. dog-sdxl-lora")
    version: int = option("version to make champion again", at_least=1)
    reason: str = option("why (kept in the model's champion history)")
    by: str = option("who rolls back (empty: $USER)", "")
    output: str | None = option("URI of a folder to write rollback.json to", None)


def rollback(config: RollbackConfig) -> dict:
    client = tracking.client()
    by = config.by.strip() or os.environ.get("USER") or "unknown"
    if not config.reason.strip():
        raise StepError(f"model {config.model_name!r} version {config.version}: --reason is empty; say why")
    check_version(client, config.model_name, config.version)
    result = move_champion(client, config.model_name, config.version, by=by, reason=config.reason,
                           action="rolled back")
    if config.output:
        with write_dir(config.output) as out:
            write_json(out / "rollback.json", result)
    return result


@dataclass
class PromoteConfig:
    """Make an approved version champion (the DAG's path after a reviewer approves it), with the approval recorded."""

    model_name: str = option("registered model name, e.g. dog-sdxl-lora")
    version: int = option("version to make champion", at_least=1)
    by: str = option("who approved it")
    reason: str = option("why (kept in the model's champion history)", "approved by a reviewer")
    compared_with: int | None = option("the champion version the approved one was compared with (0: there was none); "
                                       "refused if `champion` has moved since (a rollback during the wait)", None,
                                       at_least=0)


def promote(config: PromoteConfig) -> dict:
    client = tracking.client()
    check_version(client, config.model_name, config.version)
    if config.compared_with is not None:
        check_still_champion(client, config.model_name, config.version, config.compared_with)
    moved = move_champion(client, config.model_name, config.version, by=config.by, reason=config.reason,
                          action="approved")
    aliases = client.get_registered_model(config.model_name).aliases
    # `promoted` and `aliases`, as register's result has them, for the promotion notifier
    return {**moved, "promoted": moved["changed"],
            "aliases": sorted(a for a, v in aliases.items() if str(v) == str(config.version))}
