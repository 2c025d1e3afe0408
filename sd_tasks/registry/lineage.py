"""Has anything changed since the subject's model was trained? A nightly run asks this before it touches a GPU.

What a run would train is fixed by four things: the dataset's content hash, the recipe (a fingerprint of every
setting that changes what is trained or how it is judged, computed by the DAG), the base model and the code
version. `register` tags every version with all four (`lineage.*`). When they all equal those of the current
champion, or of the latest challenger (a version that was trained and did not win: training it again would only
repeat it), there is nothing to train.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sd_tasks.core import tracking
from sd_tasks.core.config import option
from sd_tasks.core.storage import read_json
from sd_tasks.registry.register import CHALLENGER, CHAMPION, LINEAGE, lineage_tags


@dataclass
class LineageConfig:
    """Compare what a run would train with the lineage of the subject's champion and latest challenger."""

    model_name: str = option("registered model name")
    dataset: str = option("dataset's output (URI of the folder holding dataset.json)")
    recipe_hash: str = option("fingerprint of the run's recipe")
    base_model: str = option("base model the run would train on")


def run(config: LineageConfig) -> dict:
    wanted = lineage_tags(read_json(f"{config.dataset}/dataset.json")["hash"], config.recipe_hash,
                          config.base_model)
    client = tracking.client()
    compared, seen = [], set()
    for alias in (CHAMPION, CHALLENGER):
        version = tracking.version_by_alias(client, config.model_name, alias)
        if version is None:  # no such model or alias yet
            continue
        if version.version in seen:
            continue
        seen.add(version.version)
        changed = [f"{what} ({shown(version.tags.get(tag))} -> {shown(wanted[tag])})" for tag, what in LINEAGE.items()
                   if version.tags.get(tag) != wanted[tag]]
        if not changed:
            return {"changed": False, "lineage": wanted, "same_as": f"v{version.version} ({alias})",
                    "reason": f"nothing changed since v{version.version} ({alias}) was trained: same "
                              f"{', '.join(LINEAGE.values())}"}
        compared.append(f"v{version.version} ({alias}): changed {'; '.join(changed)}")
    reason = "; ".join(compared) if compared else f"no version of {config.model_name} yet"
    return {"changed": True, "lineage": wanted, "same_as": None, "reason": reason}


def shown(value: str | None) -> str:
    """A lineage value short enough for a log line: hashes and commits cut to 12 characters."""
    if value is None:
        return "unknown"
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{28,}\b", r"\1", value)
