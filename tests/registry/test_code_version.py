"""The code version a run records (sd_tasks.registry.register.code_version): the commit, and `-dirty.<hash>` for
changes not committed, so an edited trainer is a changed code version and the next night trains."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

from conftest import REPO


def code_version(checkout) -> str:
    proc = subprocess.run([sys.executable, "-c",
                           "from sd_tasks.registry.register import code_version; print(code_version())"],
                          cwd=checkout, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_uncommitted_changes_make_another_code_version(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "sd_tasks", checkout / "sd_tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", checkout / ".gitignore")  # __pycache__ is no change
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=checkout, check=True)
    subprocess.run([*git, "add", "-A"], cwd=checkout, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=checkout, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
    assert code_version(checkout) == head
    train = checkout / "sd_tasks" / "training" / "train.py"
    train.write_text(train.read_text() + "\n# an edited trainer\n")
    edited = code_version(checkout)
    assert re.fullmatch(rf"{head}-dirty\.[0-9a-f]{{12}}", edited)
    train.write_text(train.read_text() + "# edited again\n")
    assert code_version(checkout) not in (head, edited)  # each edit its own version
    subprocess.run([*git, "commit", "-qam", "y"], cwd=checkout, check=True)
    (checkout / "sd_tasks" / "new_module.py").write_text("X = 1\n")  # a file not yet added is a change too
    assert "-dirty." in code_version(checkout)
    (checkout / "sd_tasks" / "new_module.py").unlink()
    assert "-dirty" not in code_version(checkout)
