"""Write the last `make test-reliability` run's figures into docs/reliability.md (between its `last-run` markers):
the totals the issue asks for, then every scenario with what happened. Usage: python scripts/reliability_report.py"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / ".dreamline" / "reliability" / "last-run.json"
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- last-run:begin -->", "<!-- last-run:end -->"
TITLES = {"fault": "Faults", "load": "Load", "hostile": "Hostile input", "secrets": "Secrets",
          "defect": "Known and found defects"}


def cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def figures(record: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("kind", "scenario", "outcome"))


def render(run: dict) -> str:
    records = run["records"]
    kinds = Counter(r["kind"] for r in records)
    verdict = "passed" if run["exit"] == 0 else "FAILED"
    lines = [f"Last run: {run['at']} UTC, {run.get('seconds', 0) // 60} min {run.get('seconds', 0) % 60} s, pytest exit "
             f"status {run['exit']} ({verdict}).",
             "", "| | |", "|---|---|",
             f"| faults survived | {kinds['fault']} |",
             f"| DAG runs under load | {sum(r.get('runs', 0) for r in records if r['kind'] == 'load')} |",
             f"| bad inputs tried | {kinds['hostile']} |",
             f"| defects with a test that failed before the fix | {kinds['defect']} |",
             f"| places searched for secrets | {kinds['secrets']} |",
             f"| secrets found | {sum(r.get('secrets_found', 0) for r in records)} |",
             f"| data lost | {sum(r.get('lost', 0) for r in records)} |"]
    for kind, title in TITLES.items():
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            lines += ["", f"### {title} ({len(rows)})", "", "| scenario | what happened | figures |", "|---|---|---|"]
            lines += [f"| {cell(r['scenario'])} | {cell(r['outcome'])} | {cell(figures(r))} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    if not RECORD.exists():
        print(f"error: {RECORD}: no figures; run make test-reliability first", file=sys.stderr)
        return 1
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"error: {DOC}: the {BEGIN} and {END} markers are missing", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    DOC.write_text(f"{head}{BEGIN}\n{render(json.loads(RECORD.read_text()))}\n{END}{rest.split(END, 1)[1]}")
    print(f"{DOC.relative_to(REPO)}: figures of {RECORD.relative_to(REPO)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
