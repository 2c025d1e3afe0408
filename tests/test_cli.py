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
    (tmp_path / "in").mkdir()
    assert cli.main(["validate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == \
        cli.EXIT_CRASHED
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


def _steps_with_an_output() -> list[str]:
    import dataclasses
    import importlib

    found = []
    for step, (target, _) in cli.STEPS.items():
        module, _, func = target.partition(":")
        config = cli._config_type(getattr(importlib.import_module(module), func or "run"))
        if any(f.name == "output" for f in dataclasses.fields(config)):
            found.append(step)
    return found


@pytest.mark.parametrize("step", _steps_with_an_output())
def test_no_step_writes_over_its_input(step, tmp_path, capsys, home):
    """Every step with an output folder, given the user's photos folder as its output and as each of its path
    inputs (`validate --input photos --output photos`, the README's steps without Airflow): refused in one line
    before any work, or (a step with no input, like `tiny-model`) refused where it would replace the folder; the
    photos are untouched either way."""
    import dataclasses
    import importlib
    import shutil

    from conftest import SAMPLE, tree_snapshot

    photos = tmp_path / "photos"
    shutil.copytree(SAMPLE, photos)
    (photos / "notes.txt").write_text("the user's own file")
    before = tree_snapshot(photos)
    module, _, func = cli.STEPS[step][0].partition(":")
    config = cli._config_type(getattr(importlib.import_module(module), func or "run"))
    argv = [step, *(["--output"] if step != "tiny-model" else []), str(photos)]  # tiny-model's is positional
    for field in dataclasses.fields(config):
        if field.name != "output" and field.default is dataclasses.MISSING and \
                field.default_factory is dataclasses.MISSING:
            kind = str(field.type)
            value = "1" if "int" in kind or "float" in kind else str(photos)
            argv += [f"--{field.name.replace('_', '-')}", value]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert tree_snapshot(photos) == before, err
    if step != "champion":  # with no champion registered it writes nothing, and says so
        assert code == cli.EXIT_REFUSED, err
        assert len(err.strip().splitlines()) == 1 and str(photos) in err, err


def test_an_output_inside_an_input_or_containing_it_is_refused(tmp_path, capsys):
    import shutil

    from conftest import SAMPLE, tree_snapshot

    photos = tmp_path / "shoot" / "photos"
    shutil.copytree(SAMPLE, photos)
    before = tree_snapshot(tmp_path)
    (tmp_path / "link").symlink_to(photos)
    for output in (photos / "validated", tmp_path / "shoot", tmp_path / "link"):
        assert cli.main(["validate", f"--input={photos}", f"--output={output}"]) == cli.EXIT_REFUSED
        assert "is, contains or lies inside the input" in capsys.readouterr().err
    assert tree_snapshot(tmp_path / "shoot") == {k.removeprefix("shoot/"): v for k, v in before.items()}
    # a folder of its own, beside the input: written
    assert cli.main(["validate", f"--input={photos}", f"--output={tmp_path / 'validated'}"]) == 0
    # and written again (a retry, a rerun): a folder a step made may be replaced, a user's may not
    assert cli.main(["validate", f"--input={photos}", f"--output={tmp_path / 'validated'}"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    assert cli.main(["validate", f"--input={photos}", f"--output={tmp_path / 'mine'}"]) == cli.EXIT_REFUSED
    assert "that no Dreamline step wrote" in capsys.readouterr().err
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, says", [
    (["validate", "--input=s3://", "--output={tmp}/v"], "s3://: no bucket; write s3://bucket/prefix"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--resolution=0"], "--resolution 0: a multiple of"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--resolution=100000"], "--resolution 100000: a multiple"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--resolution=1000"], "--resolution 1000: a multiple of"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--bucket-step=0"], "--bucket-step 0: one of 8, 16, 32"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--max-aspect-ratio=0"], "--max-aspect-ratio 0.0: from"),
    (["validate", "--input={tmp}", "--output={tmp}/../v", "--max-file-mb=0"], "--max-file-mb 0.0: a positive"),
])
def test_settings_the_form_would_refuse_are_refused_by_the_cli_in_one_line(argv, says, tmp_path, capsys,
                                                                          monkeypatch):
    """The steps' own CLI (the README documents it) bounds what the trigger form bounds, and names a URI without a
    bucket, in one line with the exit code that stops Airflow retrying (it used to divide by zero, or print
    `Cannot traverse all of S3` under a traceback)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "in").mkdir()
    code = cli.main([a.format(tmp=tmp_path / "in") for a in argv])
    err = capsys.readouterr().err
    assert code == cli.EXIT_REFUSED and len(err.strip().splitlines()) == 1 and says in err, err


def test_missing_s3_credentials_are_one_line_that_is_not_retried(tmp_path, capsys, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import fsspec

    fsspec.config.conf.pop("s3", None)
    type(fsspec.filesystem("s3")).clear_instance_cache()
    code = cli.main(["validate", "--input=s3://dreamline-no-such-bucket/photos", f"--output={tmp_path / 'v'}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_REFUSED and "no S3 credentials" in err and len(err.strip().splitlines()) == 1, err


def test_an_s3_uri_with_an_empty_bucket_is_refused(tmp_path, capsys):
    assert cli.main(["validate", "--input=s3:///photos", f"--output={tmp_path / 'v'}"]) == cli.EXIT_REFUSED
    assert "s3:///photos: no bucket" in capsys.readouterr().err
