"""The shape of the code is a contract (.importlinter, docs/architecture.md): sd_tasks' stages over the models over
the core with arrows only downward, no module in a circle, and an Airflow side that imports neither sd_tasks nor an
ML library. `lint-imports` checks it; here it is shown to pass on this tree and to fail on a deliberate break."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the tree at `root` (its sd_tasks/, plugins/dreamline/ and dags/)."""
    env = {**os.environ, "PYTHONPATH": f"{root / 'plugins'}{os.pathsep}{root}"}
    return subprocess.run([str(LINT), "--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_contract_holds():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "Contracts: 3 kept, 0 broken." in done.stdout


@pytest.mark.parametrize("module, line, says", [
    ("sd_tasks/core/errors.py", "from sd_tasks.registry import register", "sd_tasks.core.errors -> sd_tasks.registry"),
    ("sd_tasks/data/validate.py", "def f():\n    from sd_tasks.training import train",  # a lazy import counts
     "sd_tasks.data.validate -> sd_tasks.training.train"),
    ("sd_tasks/core/storage.py", "from sd_tasks.cli import main", "sd_tasks.core.storage -> sd_tasks.cli"),
    ("plugins/dreamline/plan.py", "from sd_tasks.core import errors", "dreamline.plan -> sd_tasks.core.errors"),
    ("dags/publish_dataset.py", "import torch", "dags.publish_dataset -> torch"),
])
def test_an_import_against_the_contract_breaks_it(tmp_path, module, line, says):
    for part in ("sd_tasks", "plugins", "dags"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}\n")
    done = lint(tmp_path)
    assert done.returncode != 0 and "1 broken" in done.stdout, done.stdout[-3000:]
    assert says in done.stdout, done.stdout[-3000:]


def test_no_modules_import_each_other_in_a_circle():
    """Within a layer too: a circle means the shared piece belongs lower (`halving` and `select` share `scores`)."""
    import grimp

    graph = grimp.build_graph("sd_tasks")
    modules = sorted(m for m in graph.modules if not graph.find_children(m))
    circles = [(a, b) for a, b in itertools.combinations(modules, 2)
               if graph.chain_exists(a, b) and graph.chain_exists(b, a)]
    assert not circles, circles


def test_only_the_cli_stands_at_the_top_of_the_package():
    top = sorted(p.name for p in (REPO / "sd_tasks").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py"]
    for package in (p for p in (REPO / "sd_tasks").iterdir() if p.is_dir() and p.name != "__pycache__"):
        doc = (package / "__init__.py").read_text()
        assert doc.startswith('"""') and ("May use:" in doc or package.name == "core"), package
