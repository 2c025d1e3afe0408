"""The step CLI: help for every step, config files under flags, one JSON line out, one error line on failure."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from sd_tasks import cli, validate


def sd_tasks(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "sd_tasks", *argv], capture_output=True, text=True, cwd=REPO,
                          **kwargs)


@pytest.mark.parametrize("step", list(cli.STEPS))
def test_every_step_has_help(step, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([step, "--help"])
    assert exit.value.code == 0
    assert f"python -m sd_tasks {step}" in capsys.readouterr().out


def test_usage_lists_the_steps():
    out = sd_tasks("--help").stdout
    assert all(step in out for step in cli.STEPS)


def test_config_file_with_flags_overriding(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    config = tmp_path / "validate.yaml"
    config.write_text(f"input: {images}\noutput: {tmp_path / 'out'}\nmin-images: 5\n")
    assert cli.main(["validate", "--config", str(config)]) == cli.EXIT_REFUSED
    assert "0 usable images, need 5" in capsys.readouterr().err
    assert cli.main(["validate", "--config", str(config), "--min-images", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accepted"] == 0


def test_a_crash_keeps_its_traceback_and_exits_retryable(tmp_path, monkeypatch, capsys):
    def crash(config: validate.ValidateConfig) -> dict:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(validate, "run", crash)
    assert cli.main(["validate", "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == cli.EXIT_CRASHED
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "error: validate: RuntimeError: disk on fire"
    assert cli.EXIT_CRASHED not in cli.FINAL_EXIT_CODES and cli.EXIT_REFUSED in cli.FINAL_EXIT_CODES


def test_failure_is_one_line_naming_the_cause(tmp_path):
    proc = sd_tasks("validate", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert proc.returncode == cli.EXIT_REFUSED == 65
    assert proc.stderr.strip() == f"error: validate: {tmp_path / 'nope'}: no such directory"
    assert proc.stdout == ""


def test_bad_config_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert cli.main(["validate", "--config", str(bad)]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: validate: {bad}: not valid JSON") and "\n" not in err
    bad.write_text('{"input": "a", "output": "b", "colour": "red"}')
    assert cli.main(["validate", "--config", str(bad)]) == cli.EXIT_REFUSED
    assert "unknown settings colour" in capsys.readouterr().err


def test_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["validate"])
    assert exit.value.code == 2
    assert "missing --input, --output" in capsys.readouterr().err
