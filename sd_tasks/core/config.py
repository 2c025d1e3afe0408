"""A step's settings: a dataclass whose fields are made by `option`, with their help text and, for numbers, their
bounds. The step CLI (sd_tasks.cli) turns such a dataclass into flags and checks the bounds before any work."""
from __future__ import annotations

import dataclasses
import operator

# A number option's bounds, as option keywords, and the test each makes of a value
BOUNDS = {"at_least": operator.ge, "above": operator.gt, "at_most": operator.le, "below": operator.lt}


def option(help: str, default=dataclasses.MISSING, **metadata):
    """A config field with its help text, and for a number its bounds (`at_least`, `above`, `at_most`, `below`: the
    trigger form's where it sets one; every number option has at least one, a test checks); list defaults are copied
    per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def bounds(f: dataclasses.Field) -> dict:
    """An option's bounds that are set, e.g. {"at_least": 1, "at_most": 100000}."""
    return {k: f.metadata[k] for k in BOUNDS if f.metadata.get(k) is not None}
