"""Known defects of the steps, each with the test that failed before its fix: --config values of the wrong type,
sidecar captions read through symlinks, publish-dataset paths that reach the registry itself, run folders shared by
two run ids, credentials of a data-registry URL in logs, tags and errors, a registration repeated by a retry, and
remote inputs cached by URI alone."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SAMPLE
from test_s3 import BUCKET, _clear_fsspec_instances, s3, s3_endpoint  # noqa: F401 (fixtures)

from sd_tasks import cli
from sd_tasks.core.errors import StepError
from sd_tasks.data import caption, dataset, validate

pytestmark = pytest.mark.reliability

TOKEN = "ghp_s3cr3tT0kenForTheTest"  # what must never show


def sd_tasks(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd_tasks", *argv], cwd=REPO, capture_output=True, text=True,
                          check=False, **kwargs)


def config_of(step_config: type, path: Path, **flags):
    parser = cli.build_parser("test", step_config)
    argv = ["--config", str(path)] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    return cli.make_config(step_config, parser.parse_args(argv), parser)


# 1. --config values take the field's type, as flags do


def test_config_file_values_are_converted_to_the_settings_types(tmp_path, figures):
    from sd_tasks.evaluation.evaluate import EvaluateConfig
    from sd_tasks.evaluation.halving import HalveConfig
    from sd_tasks.training.train import TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("cache: c\noutput: o\nbase-model: m\nlearning_rate: 1e-4\nmax_steps: '20'\n"
                    "target_modules: to_q\nlora_alpha: 8\nsnr_gamma: null\n")
    config = config_of(TrainConfig, path)
    assert config.learning_rate == 1e-4 and type(config.learning_rate) is float  # YAML 1.1 reads 1e-4 as a string
    assert config.max_steps == 20 and type(config.max_steps) is int
    assert config.target_modules == ["to_q"] and config.lora_alpha == 8.0 and config.snr_gamma is None
    assert config_of(TrainConfig, path, max_steps=5).max_steps == 5  # flags still win
    prompts = tmp_path / "evaluate.json"
    prompts.write_text(json.dumps({"checkpoint": "c", "output": "o", "instance_images": "i", "prompts": "a sks dog",
                                   "seed": "7"}))
    evaluation = config_of(EvaluateConfig, prompts)
    assert evaluation.prompts == ["a sks dog"] and evaluation.seed == 7
    rates = tmp_path / "halve.yaml"  # YAML 1.1: 1e-4 and 5e-5 are strings, 0.001 a float
    rates.write_text("learning_rates: [1e-4, 5e-5, 0.001]\n")
    halve = config_of(HalveConfig, rates, evaluations="e", output="o", rung="1", max_steps="4")
    assert halve.learning_rates == [1e-4, 5e-5, 1e-3]

    for text, reason in (("max_steps: many", "max_steps: 'many' is not an int"),
                         ("learning_rate: [1, 2]", "learning_rate: [1, 2] is not a float"),
                         ("dora: maybe", "dora: 'maybe' is not true or false"),
                         ("base_model: 1.10", "base_model: 1.1 is a number, not text (quote it)"),
                         ("cache: null", "cache: null is not a str")):
        bad = tmp_path / "bad.yaml"
        bad.write_text("cache: c\noutput: o\nbase_model: m\n" + text + "\n")
        with pytest.raises(StepError) as refused:
            config_of(TrainConfig, bad)
        assert str(refused.value) == f"{bad}: {reason}"
    figures.record("defect", "--config values typed like flags",
                   "YAML/JSON values convert to the setting's type (1e-4, '20', one scalar for a list); one that does "
                   "not is one line naming the file, the setting and the reason")


def test_a_step_run_from_a_config_file_with_string_numbers_works_and_a_bad_one_is_one_line(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(SAMPLE, images)
    good = tmp_path / "validate.yaml"
    good.write_text(yaml.safe_dump({"input": str(images), "output": str(tmp_path / "out"), "min_side": "64",
                                    "max_aspect_ratio": "4", "workers": "1"}))
    proc = sd_tasks("validate", "--config", str(good))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["accepted"] == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("min_side: '64'", "min_side: sixty-four"))
    proc = sd_tasks("validate", "--config", str(bad))
    assert proc.returncode == 65 and proc.stderr.splitlines() == [
        f"error: validate: {bad}: min_side: 'sixty-four' is not an int"]


# 2. sidecar captions are never read through a link


def test_a_sidecar_linked_to_a_secret_never_becomes_a_caption(tmp_path, figures):
    secret = tmp_path / "worker" / "credentials"
    secret.parent.mkdir()
    secret.write_text(f"aws_secret_access_key = {TOKEN}\n")
    images = tmp_path / "images"
    shutil.copytree(SAMPLE, images)
    first, second, third = sorted(p for p in images.iterdir())[:3]
    first.with_suffix(".txt").symlink_to(secret)
    second.with_suffix(".caption").symlink_to(secret)  # a link by another suffix
    third.with_suffix(".txt").write_text("sitting on a rug")  # an ordinary sidecar still counts
    validate.run(validate.ValidateConfig(input=str(images), output=str(tmp_path / "validated"), workers=1))
    result = caption.run(caption.CaptionConfig(report=str(tmp_path / "validated"), output=str(tmp_path / "captions"),
                                               instance_prompt="a photo of sks dog", strategy="sidecar"))
    manifest = (tmp_path / "captions" / "manifest.json").read_text()
    assert TOKEN not in manifest and TOKEN not in json.dumps(result)
    captions = {r["path"]: r["caption"] for r in json.loads(manifest)["records"]}
    assert captions[first.name] == captions[second.name] == "a photo of sks dog"
    assert captions[third.name] == "a photo of sks dog, sitting on a rug"
    assert result["refused_captions"] == [f"{first.with_suffix('.txt').name}: a symbolic link; not read",
                                          f"{second.with_suffix('.caption').name}: a symbolic link; not read"]
    assert secret.read_text() == f"aws_secret_access_key = {TOKEN}\n"
    figures.record("defect", "sidecar caption through a symlink",
                   "a linked sidecar is refused with its reason and the image takes the instance prompt",
                   secrets_found=0)


# 3. publish-dataset never deletes the registry


@pytest.fixture
def small_registry(tmp_path):
    repo = tmp_path / "registry"
    dataset.publish(dataset.PublishConfig(source=str(SAMPLE), repo=str(repo), path="dog", tag="dog-v1",
                                          remote=str(tmp_path / "remote")))
    return repo


def git_state(repo: Path) -> tuple:
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout

    return git("tag", "--list"), git("rev-parse", "HEAD"), git("status", "--porcelain")


def test_publish_refuses_paths_that_reach_the_registry_itself(small_registry, tmp_path, figures):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the registry's")
    (small_registry / "escape").symlink_to(elsewhere)
    before = git_state(small_registry)
    photos = tmp_path / "new-photos"
    shutil.copytree(SAMPLE, photos)
    cases = {".": "the registry itself", "": "the registry itself", "dog/..": "the registry itself",
             "..": "outside the registry", "../elsewhere": "outside the registry", str(elsewhere): "an absolute path",
             "escape": "outside the registry", ".git": "Git's or DVC's own folder",
             "dog/../.dvc/tmp": "Git's or DVC's own folder",
             ".git/hooks": "Git's or DVC's own folder", ".gitignore": "Git's or DVC's own folder"}
    for n, (path, reason) in enumerate(cases.items()):
        proc = sd_tasks("publish-dataset", "--source", str(photos), "--repo", str(small_registry), f"--path={path}",
                        "--tag", f"bad-{n}")
        assert proc.returncode == 65 and proc.stderr.splitlines() == [
            f"error: publish-dataset: --path {path!r}: {reason}; name a folder inside the registry, e.g. dog"], path
        assert git_state(small_registry) == before and (small_registry / ".git" / "HEAD").is_file()
        assert (small_registry / ".dvc" / "config").is_file() and (elsewhere / "keep.txt").is_file()
    for source in (small_registry, small_registry / "dog"):
        with pytest.raises(StepError, match=rf"^{source}: the registry itself or a folder inside it; publish a "
                                            r"folder from outside the registry$"):
            dataset.publish(dataset.PublishConfig(source=str(source), repo=str(small_registry), path="cat",
                                                  tag="cat-v1"))
    assert git_state(small_registry) == before
    figures.record("defect", "publish-dataset --path . deletes the registry",
                   "a path that is the registry, outside it or in .git/.dvc (and a source inside the registry) is "
                   "refused in one line; .git and earlier tags survive", lost=0, paths_tried=len(cases))


# 4. one run id, one run folder


def test_run_folders_are_distinct_for_distinct_run_ids_and_stable_for_one(figures):
    from dreamline.deployment import DEPLOYMENT

    pairs = [("manual__2026-11-24T01:00:00+00:00", "manual__2026-11-24T01:00:00-00:00"),
             ("manual__a b", "manual__a/b"), ("run!", "run?"), ("_x_", "x"), ("é", "è")]
    for a, b in pairs:
        assert DEPLOYMENT.run_dir("lora_dog", a) != DEPLOYMENT.run_dir("lora_dog", b), (a, b)
        assert DEPLOYMENT.run_dir("lora_dog", a) == DEPLOYMENT.run_dir("lora_dog", a)
    from dreamline.deployment import run_folder

    name = run_folder("scheduled__2026-11-24T02:00:00+00:00")
    assert name.startswith("scheduled__2026-11-24T02_00_00_00_00-") and "/" not in name and len(name) < 100
    assert len(run_folder("x" * 500)) < 100
    figures.record("defect", "two run ids, one run folder",
                   "run folders are a readable slug plus a hash of the exact run id", pairs=len(pairs))


# 5. credentials in a data-registry URL are never logged, tagged or printed

SECRET_URL = f"https://dreamline:{TOKEN}@127.0.0.1:9/data-registry.git"


def test_redact_hides_userinfo_and_signed_query_parameters():
    from sd_tasks.core.redact import redact, secrets_in

    assert redact(f"git clone {SECRET_URL} x") == "git clone https://dreamline:***@127.0.0.1:9/data-registry.git x"
    assert redact(f"https://{TOKEN}@github.com/o/r.git") == "https://***@github.com/o/r.git"
    signed = f"https://s3.example/b/k?X-Amz-Credential=AKIA&X-Amz-Signature={TOKEN}&x=1&access_token={TOKEN}"
    assert redact(signed) == ("https://s3.example/b/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1&"
                              "access_token=***")
    assert redact("ssh://git@host/repo.git s3://bucket/runs/x git@github.com:o/r.git") == (
        "ssh://git@host/repo.git s3://bucket/runs/x git@github.com:o/r.git")
    assert secrets_in(f"{SECRET_URL} {signed}") == [TOKEN, "AKIA"]
    assert (REPO / "plugins" / "dreamline" / "redact.py").read_text() == \
        (REPO / "sd_tasks" / "core" / "redact.py").read_text()


def test_a_registry_url_with_a_token_shows_in_no_error_line_or_log(tmp_path, capfd, figures):
    from airflow.sdk._shared.secrets_masker import redact as airflow_redact
    from dreamline.operators import LocalStepOperator, StepCrashed

    proc = sd_tasks("dataset", f"--repo={SECRET_URL}", "--path=dog", f"--output={tmp_path / 'out'}",
                    timeout=120)
    # nothing listens on port 9: a refused connection, which a retry can get past (exit 1), said with its cause
    assert proc.returncode == 1 and TOKEN not in proc.stdout + proc.stderr, proc.stderr
    assert "Connection refused" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: dataset: https://dreamline:***@127.0.0.1:9/")

    operator = LocalStepOperator(task_id="dataset", step="dataset",
                                 options={"repo": SECRET_URL, "path": "dog", "output": str(tmp_path / "out")})
    capfd.readouterr()
    with pytest.raises(StepCrashed) as refused:
        operator.execute({})
    logged = "".join(capfd.readouterr())  # the task log: Airflow's structlog writes it to the process's output
    assert "Running -m sd_tasks dataset --repo=https://dreamline:***@127.0.0.1:9/" in logged
    assert "error: dataset: https://dreamline:***@127.0.0.1:9/" in logged
    assert TOKEN not in logged and TOKEN not in str(refused.value)
    assert airflow_redact(f"a line holding {TOKEN}") == "a line holding ***"  # Airflow masks it in task logs too
    figures.record("defect", "registry URL with a token through the dataset step and its operator",
                   "the error line, the operator's log and its failure show *** in its place; Airflow's masker "
                   "knows it", secrets_found=0)


@pytest.fixture
def selected(tmp_path, home):
    """A selection of one checkpoint (a LoRA file and its info) and a dataset whose repo URL holds a token."""
    import numpy as np
    from safetensors.numpy import save_file

    from sd_tasks.core.storage import write_dir, write_json
    from sd_tasks.training.checkpoint_files import CHECKPOINT_INFO, LORA_WEIGHTS

    checkpoint = tmp_path / "train" / "checkpoint-10"
    with write_dir(str(checkpoint)) as out:
        layer = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a well-formed LoRA of one layer
        save_file({f"{layer}.lora_A.weight": np.zeros((4, 8), np.float32),
                   f"{layer}.lora_B.weight": np.zeros((8, 4), np.float32)}, str(out / LORA_WEIGHTS))
        write_json(out / CHECKPOINT_INFO, {"step": 10, "learning_rate": 1e-4, "base_model": "tiny/sdxl"})
    best = {"checkpoint": str(checkpoint), "learning_rate": 1e-4, "step": 10, "run_id": "r1", "suite": "s",
            "score": 0.0, "dino": 0.5, "clip_i": 0.5, "clip_t": 0.2, "preservation": 1.0}
    with write_dir(str(tmp_path / "select")) as out:
        write_json(out / "selection.json", {"selected": best, "runners_up": [], "weights": {"dino": 1.0},
                                            "base": {**best, "learning_rate": None, "checkpoint": None}})
    with write_dir(str(tmp_path / "dataset")) as out:  # as an older dataset step wrote it
        write_json(out / "dataset.json", {"repo": SECRET_URL, "path": "dog", "rev": "dog-v1", "commit": "c" * 40,
                                          "hash": "sha256:0", "files": []})
    return tmp_path


def register_config(root: Path, name: str):
    from sd_tasks.registry import register

    return register.RegisterConfig(selection=str(root / "select"), dataset=str(root / "dataset"), model_name=name,
                                   output=str(root / "register"), experiment="defects")


def test_register_tags_and_card_hold_no_token(selected, figures):
    from sd_tasks.core import tracking
    from sd_tasks.registry import register

    result = register.run(register_config(selected, "defects-token"))
    version = tracking.client().get_model_version("defects-token", str(result["version"]))
    assert version.tags["dataset.repo"] == "https://dreamline:***@127.0.0.1:9/data-registry.git"
    assert TOKEN not in json.dumps(version.tags) + version.description + json.dumps(result)
    assert TOKEN not in (selected / "register" / "registration.json").read_text()
    figures.record("defect", "registry URL with a token in dataset.json, registered",
                   "the version's tags and model card name the repo with *** for the token", secrets_found=0)


# 6. a retried registration never registers twice


def test_a_register_killed_between_creating_the_version_and_tagging_it_registers_once_on_retry(
        selected, monkeypatch, figures):
    from mlflow.tracking import MlflowClient

    from sd_tasks.core import tracking
    from sd_tasks.registry import register

    real_create = MlflowClient._create_model_version
    kills = []

    def killed_right_after(self, *args, **kwargs):
        version = real_create(self, *args, **kwargs)
        if not kills:
            kills.append(version.version)
            raise KeyboardInterrupt  # the pod's SIGTERM, as the CLI turns it into an exception
        return version

    monkeypatch.setattr(MlflowClient, "_create_model_version", killed_right_after)
    config = register_config(selected, "defects-retry")
    with pytest.raises(KeyboardInterrupt):
        register.run(config)
    assert register.run(config)["version"] == 1
    versions = tracking.client().search_model_versions("name = 'defects-retry'")
    assert [int(v.version) for v in versions] == [1]
    tags = versions[0].tags
    assert tags["dreamline.run_key"] == str(selected / "train" / "checkpoint-10")
    assert tags["step"] == "10" and tags["dataset.rev"] == "dog-v1"
    assert "SDXL DreamBooth-LoRA `defects-retry`" in versions[0].description
    figures.record("defect", "register killed between version and tags",
                   "the run key is on the version from its creation; the retry finds it and completes its tags and "
                   "card: one version", versions=len(versions))


def test_an_mlflow_outage_while_looking_for_the_version_fails_the_step_instead_of_registering_again(
        selected, monkeypatch, figures):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    from mlflow.tracking import MlflowClient

    from sd_tasks.core import tracking
    from sd_tasks.registry import register

    config = register_config(selected, "defects-outage")
    assert register.run(config)["version"] == 1

    def unavailable(self, *args, **kwargs):
        raise MlflowException("API request failed with error code 503", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, "search_model_versions", unavailable)
    with pytest.raises(MlflowException, match="503"):
        register.run(config)
    monkeypatch.undo()
    assert [int(v.version) for v in tracking.client().search_model_versions("name = 'defects-outage'")] == [1]
    figures.record("defect", "MLflow outage in existing_version",
                   "only 'not found' counts as absent: an outage fails the step (retried) instead of registering "
                   "a second version", versions=1)


# 7. remote inputs: concurrent readers and objects rewritten in place

READ_AND_DESCRIBE = """
import hashlib, json, sys
from sd_tasks.core import storage
local = storage.read_dir(sys.argv[1])
print(json.dumps({"path": str(local), "files": {p.relative_to(local).as_posix(): hashlib.sha256(p.read_bytes())
      .hexdigest() for p in sorted(local.rglob("*")) if p.is_file()}}))
"""


def test_two_processes_reading_one_s3_uri_at_once_both_get_the_whole_copy(s3, tmp_path, figures):
    from sd_tasks.core import storage

    uri = f"s3://{BUCKET}/runs/defects-concurrent/resized"
    with storage.write_dir(uri) as out:
        for p in sorted(SAMPLE.iterdir()):
            (out / p.name).write_bytes(p.read_bytes())
    readers = [subprocess.Popen([sys.executable, "-c", READ_AND_DESCRIBE, uri], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in readers]
    assert [r.returncode for r in readers] == [0, 0], [err for _, err in outputs]
    seen = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    assert seen[0] == seen[1]
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in SAMPLE.iterdir()}
    assert {k: v for k, v in seen[0]["files"].items() if k != storage.MARKER} == expected
    assert [p.name for p in (tmp_path / "sd_tasks-cache").iterdir()] == [Path(seen[0]["path"]).name]
    figures.record("defect", "two processes read one S3 folder at once",
                   "both end with one whole, identical copy; no staging folder left", lost=0, readers=2)


def test_an_object_rewritten_in_place_with_the_same_size_is_fetched_again(s3, figures):
    from sd_tasks.core import storage

    uri = f"s3://{BUCKET}/runs/defects-rewritten/shard"
    with storage.write_dir(uri) as out:
        (out / "latents.safetensors").write_bytes(b"x" * 100)
    assert (storage.read_dir(uri) / "latents.safetensors").read_bytes() == b"x" * 100  # marked: checked whole
    s3.put_object(Bucket=BUCKET, Key="runs/defects-rewritten/shard/latents.safetensors", Body=b"y" * 100)
    _clear_fsspec_instances()
    assert (storage.read_dir(uri) / "latents.safetensors").read_bytes() == b"y" * 100
    assert storage.is_whole(uri)  # same size: the marker still matches
    assert all(info.get("ETag") for info in storage._listing(uri).values())  # what tells the two apart
    figures.record("defect", "remote input cached by URI alone",
                   "the cache key holds every file's size and ETag: a same-size rewrite is fetched again", lost=0)
