"""The step CLI: help for every step, config files under flags, one JSON line out, one error line on failure."""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import typing
import sys

import pytest

from conftest import REPO
from sd_tasks import cli
from sd_tasks.data import validate


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


def step_config(step: str) -> type:
    """A step's config dataclass."""
    module, _, func = cli.STEPS[step][0].partition(":")
    return cli._config_type(getattr(importlib.import_module(module), func or "run"))


def _steps_with_an_output() -> list[str]:
    return [step for step in cli.STEPS if any(f.name == "output" for f in dataclasses.fields(step_config(step)))]


@pytest.mark.parametrize("step", _steps_with_an_output())
def test_no_step_writes_over_its_input(step, tmp_path, capsys, home):
    """Every step with an output folder, given the user's photos folder as its output and as each of its path
    inputs (`validate --input photos --output photos`, the steps without Airflow, docs/operating.md): refused in one
    line before any work, or (a step with no input, like `tiny-model`) refused where it would replace the folder; the
    photos are untouched either way."""
    import shutil

    from conftest import SAMPLE, tree_snapshot

    photos = tmp_path / "photos"
    shutil.copytree(SAMPLE, photos)
    (photos / "notes.txt").write_text("the user's own file")
    before = tree_snapshot(photos)
    config = step_config(step)
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
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--resolution=0"], "--resolution 0: at least 8 and at most"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--resolution=100000"], "--resolution 100000: at least"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--resolution=1000"], "--resolution 1000: a multiple of"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--bucket-step=0"], "--bucket-step 0: at least 8"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--bucket-step=24"], "--bucket-step 24: one of 8, 16, 32"),
    (["resize", "--captions={tmp}/c", "--output={tmp}/r", "--max-aspect-ratio=0"], "--max-aspect-ratio 0.0: at least 1"),
    (["validate", "--input={tmp}", "--output={tmp}/../v", "--max-file-mb=0"], "--max-file-mb 0.0: above 0"),
])
def test_settings_the_form_would_refuse_are_refused_by_the_cli_in_one_line(argv, says, tmp_path, capsys,
                                                                          monkeypatch):
    """The steps' own CLI (docs/operating.md documents it) bounds what the trigger form bounds, and names a URI
    without a bucket, in one line with the exit code that stops Airflow retrying (it used to divide by zero, or print
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


def number_options() -> list[tuple[str, dataclasses.Field, type]]:
    """(step, field, int or float) for every number option of every step."""
    found = []
    for step in cli.STEPS:
        config = step_config(step)
        hints = typing.get_type_hints(config)
        found += [(step, f, kind) for f in dataclasses.fields(config)
                  if (kind := cli._scalar_type(hints[f.name])[0]) in (int, float)]
    return found


def test_every_number_option_is_bounded():
    """A step flag without bounds takes a zero batch size or a negative step count, and fails late or not at all."""
    unbounded = [f"{step} --{f.name}" for step, f, _ in number_options() if not set(cli.BOUNDS) & set(f.metadata)]
    assert len(number_options()) > 50 and not unbounded, unbounded


def _outside() -> list[tuple[str, str, str]]:
    """(step, flag, value) just outside each bound of each number option, and a NaN for each float option."""
    cases = []
    for step, f, kind in number_options():
        flag = "--" + f.name.replace("_", "-")
        step_size = 1 if kind is int else 0.001
        for key, bound in ((k, f.metadata.get(k)) for k in cli.BOUNDS):
            if bound is not None:
                value = {"at_least": bound - step_size, "above": bound, "at_most": bound + step_size,
                         "below": bound}[key]
                cases.append((step, flag, str(kind(value))))
        if kind is float:
            cases.append((step, flag, "nan"))
    return cases


@pytest.mark.parametrize("step, flag, value", _outside())
def test_a_number_outside_its_bounds_is_refused_in_one_line_before_any_work(step, flag, value, tmp_path, capsys):
    config = step_config(step)
    argv = [step, f"{flag}={value}"]
    for f in dataclasses.fields(config):  # required settings: in bounds, naming nothing that exists
        if cli._required(f) and "--" + f.name.replace("_", "-") != flag:
            kind = cli._scalar_type(typing.get_type_hints(config)[f.name])[0]
            good = f.metadata.get("at_least", 1) if kind in (int, float) else str(tmp_path / f.name)
            argv += [str(good)] if f.metadata.get("positional") else [f"--{f.name.replace('_', '-')}={good}"]
    assert cli.main(argv) == cli.EXIT_REFUSED
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {step}: {flag} ") and len(err.splitlines()) == 1, err
    assert ("above" in err or "at least" in err or "at most" in err or "below" in err), err
    assert not any(tmp_path.iterdir())  # nothing was written


# The trigger form's settings and the step options they become (dreamline.plan): each bounded alike.
FORM_TO_STEPS = {
    "max_steps": [("train", "max_steps"), ("halve", "max_steps")], "checkpointing_steps": [("train",
                                                                                           "checkpointing_steps")],
    "rank": [("train", "rank")], "prior_loss_weight": [("train", "prior_loss_weight")],
    "learning_rates": [("train", "learning_rate"), ("halve", "learning_rates")],
    "halving_rungs": [("train", "stop_at_step"), ("halve", "rung")], "halving_keep": [("halve", "keep")],
    "seed": [("train", "seed"), ("resize", "seed"), ("class-images", "seed")],
    "resolution": [("class-images", "resolution"), ("evaluate", "resolution")],
    "num_class_images": [("class-images", "count")],
    "images_per_prompt": [("evaluate", "images_per_prompt")],
    "confirmation_images_per_prompt": [("evaluate", "images_per_prompt")],
    "inference_steps": [("evaluate", "num_inference_steps")],
    "confirmation_inference_steps": [("evaluate", "num_inference_steps")],
    **{f"weight_{w}": [("select", f"weight_{w}"), ("halve", f"weight_{w}")]
       for w in ("accuracy", "flexibility", "preservation")},
    "promotion_confidence": [("register", "confidence")], "promotion_margin": [("register", "margin")],
}


@pytest.mark.parametrize("setting", sorted(FORM_TO_STEPS))
def test_the_steps_bound_a_setting_as_the_form_does(setting):
    """What the form refuses, the step's CLI refuses (docs/operating.md runs steps without Airflow), and no more."""
    from dreamline.params import dag_params
    from dreamline.subjects import Subject

    schema = dag_params(Subject("dog", "dog"))[setting].schema
    schema = schema.get("items", schema) if schema.get("type") == "array" else schema
    form = {"at_least": schema.get("minimum"), "above": schema.get("exclusiveMinimum"),
            "at_most": schema.get("maximum"), "below": schema.get("exclusiveMaximum")}
    for step, name in FORM_TO_STEPS[setting]:
        [f] = [f for f in dataclasses.fields(step_config(step)) if f.name == name]
        assert {k: f.metadata.get(k) for k in cli.BOUNDS} == form, (setting, step, name)
