"""Secrets: after the ten load runs (full_stack.py), no planted credential appears anywhere a user, a reviewer or a
log reader can look: task and service logs, MLflow's params, tags, model versions and model cards, the artifacts
and run records in S3, XComs, rendered template fields, and the pods the DAG would launch in kubernetes mode.

The credentials are the stack's own generated secrets (S3 keys, database passwords, Airflow's keys), the webhook
connection's bearer token and a data-registry token in git's environment (GIT_CONFIG_*); each test first checks
that the credential was really in play, so that finding nothing means something."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reliability.full_stack import GIT_ENV, RUN_ID, SUBJECT_DATA, WEBHOOK_TOKEN, dag_id
from test_pods import pods_command
from stack_client import path, query
from deploy.local.bootstrap import s3_client

pytestmark = pytest.mark.reliability

TEXT_LIMIT = 2 * 1024 * 1024  # S3 objects above this are weights and images, not text a secret could hide in


def found(full_stack, texts: dict[str, str]) -> list[tuple[str, str]]:
    """(where, which credential) for every planted credential in every text."""
    return [(where, name) for where, text in texts.items() for name, value in full_stack["secrets"].items()
            if value in text]


def check(full_stack, figures, place: str, texts: dict[str, str]) -> None:
    hits = found(full_stack, texts)
    figures.record("secrets", place, f"{len(full_stack['secrets'])} credentials searched for in {len(texts)} items: "
                   f"{len(hits)} found", secrets_found=len(hits), searched=len(texts))
    assert texts and not hits, hits[:20]


def test_the_credentials_were_in_play(full_stack):
    """The webhook was called with its token, and the steps' processes carried the registry token: the scheduler
    that starts them (LocalExecutor) has it in its environment, and the grep finds what it looks for."""
    requests = full_stack["receiver"].requests
    assert len(requests) == 10 and {r["headers"]["Authorization"] for r in requests} == {f"Bearer {WEBHOOK_TOKEN}"}
    assert {r["body"]["event"] for r in requests} == {"promotion"}
    folder: Path = full_stack["folder"]
    pid = json.loads((folder / "pids" / "airflow-scheduler.json").read_text())["pid"]
    environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    assert {k: environ.get(k) for k in GIT_ENV} == GIT_ENV
    assert len(found(full_stack, {"stack.json": (folder / "stack.json").read_text()})) == \
        len(full_stack["secrets"]) - 2  # all the stack's own; the two planted ones are not stored there


def test_no_credential_in_any_log(full_stack, figures):
    folder: Path = full_stack["folder"]
    logs = sorted(p for p in (folder / "airflow").rglob("*") if p.is_file() and p.suffix == ".log")
    logs += sorted((folder / "mlflow").glob("*.log")) + sorted((folder / "registry").glob("*.log"))
    assert any("dag_id=lora_s9" in str(p) for p in logs)  # the task logs are among them
    check(full_stack, figures, "task and service logs", {str(p.relative_to(folder)): p.read_text(errors="replace")
                                                          for p in logs})


def test_no_credential_in_mlflow(full_stack, figures):
    settings = full_stack["settings"]
    rows = query(settings, "mlflow", "SELECT 'param ' || run_uuid || ' ' || key, value FROM params "
                                     "UNION ALL SELECT 'tag ' || run_uuid || ' ' || key, value FROM tags "
                                     "UNION ALL SELECT 'version tag ' || name || ' ' || version || ' ' || key, value "
                                     "FROM model_version_tags "
                                     "UNION ALL SELECT 'model version ' || name || ' ' || version, "
                                     "coalesce(description, '') || ' ' || coalesce(source, '') FROM model_versions "
                                     "UNION ALL SELECT 'model ' || name, coalesce(description, '') "
                                     "FROM registered_models "
                                     "UNION ALL SELECT 'logged model param ' || model_id || ' ' || param_key, "
                                     "param_value FROM logged_model_params "
                                     "UNION ALL SELECT 'logged model tag ' || model_id || ' ' || tag_key, tag_value "
                                     "FROM logged_model_tags")
    texts = {where: value or "" for where, value in rows}
    assert len([w for w in texts if w.startswith("model version ")]) == 10  # with their model cards
    assert any(w.startswith("logged model param ") for w in texts)  # the evaluated checkpoints
    check(full_stack, figures, "MLflow params, tags, model versions and model cards", texts)


def test_no_credential_in_s3_artifacts_and_run_records(full_stack, figures):
    settings = full_stack["settings"]
    s3 = s3_client(settings)
    texts = {}
    for prefix in ("mlflow/", "runs/"):
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=prefix)
        for item in (o for page in pages for o in page.get("Contents", [])):
            if item["Size"] <= TEXT_LIMIT and not item["Key"].endswith((".png", ".jpg", ".safetensors")):
                texts[item["Key"]] = s3.get_object(Bucket=settings.bucket, Key=item["Key"])["Body"].read().decode(
                    errors="replace")
    assert any(k.endswith("report.md") for k in texts) and any(k.endswith("/MLmodel") for k in texts)
    check(full_stack, figures, "S3: MLflow artifacts (reports, MLmodel) and run records", texts)


def xcom_values(api, subject: str) -> dict[str, str]:
    base = f"{api.base}/dags/{dag_id(subject)}/dagRuns/{path(RUN_ID)}/taskInstances/~/xcomEntries"
    entries = api.get(base, params={"limit": 500}).json()["xcom_entries"]
    values = {}
    for entry in entries:
        answer = api.get(f"{api.base}/dags/{dag_id(subject)}/dagRuns/{path(RUN_ID)}/taskInstances/"
                         f"{entry['task_id']}/xcomEntries/{entry['key']}", params={"map_index": entry["map_index"]})
        assert answer.status_code == 200, answer.text
        values[f"{subject} {entry['task_id']}[{entry['map_index']}] {entry['key']}"] = json.dumps(answer.json())
    return values


def test_no_credential_in_xcoms(full_stack, figures):
    api = full_stack["api"]
    texts = {where: value for subject in SUBJECT_DATA for where, value in xcom_values(api, subject).items()}
    assert len(texts) >= 10 * 15, len(texts)
    check(full_stack, figures, "XComs (REST xcomEntries)", texts)


def test_no_credential_in_rendered_template_fields(full_stack, figures):
    texts = {f"{subject} {t['task_id']}[{t['map_index']}]": json.dumps(t.get("rendered_fields"))
             for subject, run in full_stack["runs"].items() for t in run["tasks"]}
    assert sum("options" in text for text in texts.values()) >= 10 * 15
    check(full_stack, figures, "Airflow rendered template fields (REST)", texts)


def test_no_credential_in_rendered_pods(full_stack, figures, tmp_path):
    """The pods one run of each of two subjects would launch in kubernetes mode, rendered with every credential in
    the environment (as Airflow's would hold them): the pods name the Secrets, never a value."""
    settings, secrets = full_stack["settings"], full_stack["secrets"]
    webhook = json.dumps({"conn_type": "http", "host": "127.0.0.1", "password": WEBHOOK_TOKEN})
    env = {**settings.s3_env(), **GIT_ENV, "AIRFLOW_CONN_DREAMLINE_WEBHOOK": webhook,
           "MLFLOW_TRACKING_USERNAME": "dreamline", "MLFLOW_TRACKING_PASSWORD": secrets["stack mlflow_db_password"],
           "DREAMLINE_SUBJECTS": str(full_stack["subjects_file"])}
    texts = {}
    for subject in ("s0", "s9"):
        rendered = pods_command(tmp_path, "--subject", subject, "--conf", "{}", **env)
        assert rendered.returncode == 0, rendered.stderr[-3000:]
        for number, manifest in enumerate(rendered.stdout.split("---\n")[1:]):
            texts[f"{subject} pod {number} {manifest.splitlines()[0]}"] = manifest
    assert len(texts) >= 2 * 12 and all("sd_tasks" in t for t in texts.values())
    check(full_stack, figures, "rendered pods (python -m dreamline.pods)", texts)


def test_a_token_in_the_registry_url_never_reaches_the_disk(registry, tmp_path, figures):
    """The `dataset` step clones the data registry from a Git server that asks for credentials, given as a
    token-bearing URL (https://user:token@host/...): the token travels as a request header, never into the clone's
    `.git/config` nor any other file, while the step runs (the server looks at the disk at each request) or after it;
    the clone and DVC's files are gone afterwards, on success and on failure."""
    import base64
    import os
    import subprocess
    import sys

    from conftest import REPO
    from git_http import GitHttpServer

    token = "registry-url-token-8d41f07c"
    served = tmp_path / "served"
    subprocess.run(["git", "clone", "-q", "--bare", str(registry), str(served / "registry.git")], check=True)
    scratch, home, work = tmp_path / "tmp", tmp_path / "home", tmp_path / "work"
    during: set[str] = set()

    def look() -> None:
        for p in [*scratch.rglob("*"), *home.rglob("*"), *work.rglob("*")]:
            try:
                if p.is_file() and token.encode() in p.read_bytes():
                    during.add(str(p))
            except OSError:  # removed while looked at
                pass

    server = GitHttpServer(served, "ci", token, on_request=look)
    for folder in (scratch, home, work):
        folder.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")}, "TMPDIR": str(scratch),
           "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "DVC_SITE_CACHE_DIR": str(home / "site-cache"),
           "GIT_TERMINAL_PROMPT": "0", "PYTHONPATH": str(REPO)}
    said = {}
    try:
        for case, secret, rev in [("ok", token, "dog-v1"), ("missing", token, "no-such-tag"),
                                  ("refused", "wrong-token", "dog-v1")]:
            done = subprocess.run([sys.executable, "-m", "sd_tasks", "dataset",
                                   f"--repo=http://ci:{secret}@{server.base}/registry.git", "--path=dog",
                                   f"--rev={rev}", f"--output={work / case}"], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=300)
            said[case] = (done.returncode, done.stdout + done.stderr)
    finally:
        server.close()
    assert said["ok"][0] == 0 and (work / "ok" / "images").is_dir(), said["ok"]
    assert said["missing"][0] == 65 and said["refused"][0] == 65, said
    assert len(said["refused"][1].strip().splitlines()) == 1, said["refused"]
    assert "No valid credentials" in said["refused"][1] and "wrong-token" not in said["refused"][1]
    assert f"Basic {base64.b64encode(f'ci:{token}'.encode()).decode()}" in server.seen  # the token was in play
    assert not list(scratch.iterdir()), list(scratch.rglob("*"))[:5]
    assert not (home / "site-cache").exists()  # DVC's site cache of a clone stays in the scratch folder too
    files = [p for p in [*home.rglob("*"), *work.rglob("*")] if p.is_file()]
    hits = [str(p) for p in files if token.encode() in p.read_bytes()]
    hits += [case for case, (_, output) in said.items() if token in output] + sorted(during)
    figures.record("secrets", "a token-bearing Git URL for the data registry",
                   f"the token searched for in {len(files)} files the step wrote and in its output: {len(hits)} found",
                   secrets_found=len(hits), searched=len(files))
    assert files and not hits, hits
