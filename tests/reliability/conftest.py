"""The suite's figures: every scenario records what it tried and what it found through the `figures` fixture; the
session writes them to .dreamline/reliability/last-run.json and prints the totals docs/reliability.md quotes."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from conftest import REPO

KINDS = ("fault", "load", "hostile", "secrets", "defect")
RECORD = REPO / ".dreamline" / "reliability" / "last-run.json"
_records: list[dict] = []


class Figures:
    def record(self, kind: str, scenario: str, outcome: str, **figures) -> None:
        """One scenario tried: `outcome` is what happened, in words ("resumed to the same weights"); figures are
        counts and seconds (lost=0, secrets_found=0, runs=10, ...)."""
        assert kind in KINDS, kind
        _records.append({"kind": kind, "scenario": scenario, "outcome": outcome, **figures})


@pytest.fixture(scope="session")
def figures() -> Figures:
    return Figures()


_started = time.monotonic()


def pytest_sessionfinish(session, exitstatus):
    if not _records:
        return
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps({"at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "exit": int(exitstatus),
                                  "seconds": round(time.monotonic() - _started), "records": _records},
                                 indent=1) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not _records:
        return
    counts = Counter(r["kind"] for r in _records)
    lost = sum(r.get("lost", 0) for r in _records)
    found = sum(r.get("secrets_found", 0) for r in _records)
    terminalreporter.write_sep("=", "reliability figures")
    for kind in KINDS:
        terminalreporter.write_line(f"{kind:8} {counts.get(kind, 0)} scenarios")
    terminalreporter.write_line(f"secrets found {found}, data lost {lost}; details in {RECORD.relative_to(REPO)}")


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory):
    """The full stack after ten subjects' runs at once, with known fake credentials planted (full_stack.py);
    shared by test_load.py and test_secrets.py, torn down at the end of the session."""
    from reliability.full_stack import bring_up

    yield from bring_up(tmp_path_factory)
