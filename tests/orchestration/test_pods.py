"""Kubernetes mode without a cluster: the pods one DAG run would launch (`make pods`), checked with the Kubernetes
client's own models, and the deployment settings a pod could not use, refused at parse time in one line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO

SETTINGS = REPO / "deploy" / "kubernetes" / "dreamline.env"  # also test_dag.kubernetes_settings
CONF = {"learning_rates": [1e-4, 5e-4], "max_steps": 200, "checkpointing_steps": 100, "prior_preservation": True,
        "encode_shard_size": 2}
GPU_STEPS = {"encode", "class-images", "train", "evaluate"}
MODEL_STEPS = {"pin-models", "caption", "encode", "class-images", "train", "evaluate"}  # pin-models fetches into it
CREDENTIAL = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|AUTH", re.I)


def pods_command(tmp_path, *args: str, settings=SETTINGS, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMLINE_", "MLFLOW_"))}
    environ |= {"PYTHONPATH": str(REPO / "plugins"), "AIRFLOW_HOME": str(tmp_path / "airflow"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", **env}
    return subprocess.run([sys.executable, "-m", "dreamline.pods", "--settings", str(settings), *args],
                          capture_output=True, text=True, env=environ, cwd=tmp_path)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> list[tuple[str, dict]]:
    proc = pods_command(tmp_path_factory.mktemp("pods"), "--conf", json.dumps(CONF))
    assert proc.returncode == 0, proc.stderr
    headers = re.findall(r"^# (.+)$", proc.stdout, re.M)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert len(headers) == len(docs)
    return list(zip(headers, docs))


def test_every_pod_of_a_run_is_listed(manifests):
    tasks = [what.split(":")[0] for what, _ in manifests]
    assert tasks[:2] == ["models", "dataset"]
    assert tasks[-4:] == ["select", "confirm", "register", "close_mlflow_run"]  # in run order; no approval: no promote
    assert sorted(tasks) == sorted(["models", "dataset", "lineage", "mlflow_run", "validate", "caption", "resize",
                                    "encode[0]", "encode[1]", "encode[2]", "merge_cache", "class_images",
                                    "encode_class_images", "champion", "train[0]", "train[1]",
                                    *[f"evaluate[{i}]" for i in range(4)], "select",  # 4 GPU slots (dreamline.env):
                                    "confirm", "register", "close_mlflow_run"])  # each rate, champion, base


def test_every_step_after_models_loads_the_models_as_pinned(manifests):
    """`models` pins each hub model to a commit; every step that loads one is given `id@sha`, never the bare id."""
    first = container(manifests[0][1])["args"]
    assert first[0] == "pin-models" and "--base-model=stabilityai/stable-diffusion-xl-base-1.0" in first
    given = [arg for _, pod in manifests[1:] for arg in container(pod)["args"]
             if arg.startswith(("--base-model=", "--clip-model=", "--dino-model="))]
    assert given and all(arg.endswith("@<commit>") for arg in given), given


def test_manifests_are_valid_pods_for_the_kubernetes_client(manifests):
    from kubernetes.client import ApiClient

    client = ApiClient()
    for what, doc in manifests:
        pod = client.deserialize(SimpleNamespace(data=json.dumps(doc)), "V1Pod")  # required fields are checked
        # every key is one the models know: nothing was dropped on the way in
        assert client.sanitize_for_serialization(pod) == doc, what


def test_gpu_steps_get_a_gpu_node_and_shared_memory_and_cpu_steps_do_not(manifests):
    for what, pod in manifests:
        step = container(pod)["args"][0]
        spec, limits = pod["spec"], container(pod)["resources"]["limits"]
        shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
        if step in GPU_STEPS:
            assert limits["nvidia.com/gpu"] == "1", what
            assert spec["nodeSelector"] == {"dreamline.io/pool": "gpu"}, what
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert shm[0]["emptyDir"]["medium"] == "Memory" and mount(pod, "dshm") == "/dev/shm", what
        else:
            assert "nvidia.com/gpu" not in limits and not spec.get("tolerations") and not shm, what
            assert not spec.get("nodeSelector"), what


def test_steps_that_load_a_model_mount_the_model_cache_as_their_hugging_face_cache(manifests):
    for what, pod in manifests:
        step = container(pod)["args"][0]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        env = {e["name"]: e.get("value") for e in container(pod)["env"]}
        if step in MODEL_STEPS:
            assert claims == ["dreamline-model-cache"] and mount(pod, "model-cache") == "/models", what
            assert env["HF_HOME"] == "/models/huggingface"
        else:
            assert claims == [] and env["HF_HOME"].startswith("/tmp/"), what


def test_credentials_come_from_secrets_and_settings_from_the_configmap(manifests):
    for what, pod in manifests:
        c = container(pod)
        assert c["envFrom"] == [
            {"configMapRef": {"name": "dreamline-config"}}, {"secretRef": {"name": "dreamline-s3"}},
            *[{"secretRef": {"name": n, "optional": True}} for n in ("dreamline-mlflow", "dreamline-hf",
                                                                      "dreamline-git")]], what
        literal = {e["name"] for e in c["env"] if "value" in e}
        assert not {n for n in literal if CREDENTIAL.search(n)}, what
        assert {e["name"]: e["value"] for e in c["env"]}["MLFLOW_TRACKING_URI"] == \
            "http://mlflow.dreamline.svc.cluster.local:5000"
        text = json.dumps(pod)
        assert not re.search(r"AKIA[0-9A-Z]{16}|://[^/\s\"]+:[^/\s\"]+@", text), what  # no key ids, no user:pass@
        assert pod["spec"]["serviceAccountName"] == "dreamline-worker"
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
        assert c["image"] == "registry.example.com/dreamline/worker:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"


def test_pods_run_restricted(manifests):
    for what, pod in manifests:
        assert pod["spec"]["securityContext"] == {"fsGroup": 0, "runAsGroup": 0, "runAsNonRoot": True,
                                                  "runAsUser": 50000, "seccompProfile": {"type": "RuntimeDefault"}}
        for c in pod["spec"]["containers"]:  # the XCom sidecar too
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "privileged": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True}, what
        assert mount(pod, "scratch") == "/tmp"  # the one writable place besides the volumes
        [scratch] = [v for v in pod["spec"]["volumes"] if v["name"] == "scratch"]
        resources = container(pod)["resources"]
        # requested, so the scheduler places the pod where the disk is, and bounded, so it cannot fill the node's
        assert scratch["emptyDir"]["sizeLimit"] == resources["requests"]["ephemeral-storage"] == \
            resources["limits"]["ephemeral-storage"], what


def test_pods_are_labelled_by_dag_task_run_and_map_index(manifests):
    for what, pod in manifests:
        labels = pod["metadata"]["labels"]
        task = what.split(":")[0]
        assert labels["dag_id"] == "lora_dog" and labels["task_id"] == task.split("[")[0]
        assert labels["run_id"].startswith("manual__2026-01-01T02")
        assert labels.get("map_index") == (task.split("[")[1].rstrip("]") if "[" in task else None)
        assert labels["app.kubernetes.io/name"] == "dreamline"
        assert labels["app.kubernetes.io/component"] == container(pod)["args"][0]


def test_train_pods_get_the_production_recipe(manifests):
    trains = [pod for what, pod in manifests if what.startswith("train[")]
    args = container(trains[0])["args"]
    assert "--mixed-precision=auto" in args and "--gradient-checkpointing" in args
    assert [a.split("=", 1)[1] for pod in trains for a in container(pod)["args"] if "=s3://" in a][:2] == [
        "s3://dreamline/cache/encode/<encode.key>", "s3://dreamline/cache/encode/<encode_class_images.key>"]
    assert container(trains[0])["command"] == ["python", "-m", "sd_tasks"]


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("DREAMLINE_STORAGE", "/data/runs", "DREAMLINE_STORAGE=/data/runs: in kubernetes mode it must be a remote URI"),
    ("DREAMLINE_CACHE", "file:///cache", "DREAMLINE_CACHE=file:///cache: in kubernetes mode it must be a remote URI"),
    ("DREAMLINE_DATASET_REPO", "/srv/registry", "DREAMLINE_DATASET_REPO=/srv/registry: in kubernetes mode it must "
                                                "be a Git URL"),
    ("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db", "MLFLOW_TRACKING_URI=sqlite:///mlflow.db: in kubernetes mode it "
                                                   "must be an MLflow tracking server"),
    ("MLFLOW_TRACKING_URI", "https://me:pw@mlflow", "MLFLOW_TRACKING_URI: holds credentials; put them in the Secret"),
    ("DREAMLINE_BASE_MODEL", "/home/me/sdxl", "DREAMLINE_BASE_MODEL=/home/me/sdxl: a path on this machine"),
    ("DREAMLINE_DATASET_REPO", "https://oauth2:ghp_x@github.com/me/data.git",
     "DREAMLINE_DATASET_REPO: holds credentials; put them in the Secret named by DREAMLINE_GIT_SECRET"),
    ("DREAMLINE_IMAGE", "registry.example.com/dreamline/worker:latest", "pin the worker image by tag or digest"),
    ("DREAMLINE_IMAGE", "registry.example.com:5000/dreamline/worker", "pin the worker image by tag or digest"),
    ("DREAMLINE_SCREEN", "/home/me/screen.py:Mine", "DREAMLINE_SCREEN=/home/me/screen.py:Mine: a file on this machine"),
    ("DREAMLINE_SCREEN", "nudenett", "DREAMLINE_SCREEN='nudenett': use nudenet, off, or FILE.py:NAME"),
    # settings read as the deployment module loads: they were a traceback here before
    ("DREAMLINE_GPU_HOUR_PRICE", "cheap", "DREAMLINE_GPU_HOUR_PRICE='cheap': a price"),
    ("DREAMLINE_RETRY_DELAY", "-5", "DREAMLINE_RETRY_DELAY='-5': seconds before a retry"),
])
def test_a_kubernetes_deployment_refuses_what_a_pod_could_not_use(tmp_path, setting, value, message):
    settings = tmp_path / "bad.env"
    settings.write_text(SETTINGS.read_text() + f"\n{setting}={value}\n")
    proc = pods_command(tmp_path, settings=settings)
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()  # one line, naming the setting
    assert message in line and line.startswith(f"error: {settings}: ")


def test_a_kubernetes_deployment_with_a_local_setting_fails_dag_parsing_naming_it(tmp_path):
    from test_dag import PARSE, airflow_env, kubernetes_settings

    env = airflow_env(tmp_path, **{**kubernetes_settings(), "DREAMLINE_STORAGE": str(tmp_path / "runs")})
    proc = subprocess.run([sys.executable, "-c", PARSE, str(REPO / "dags")], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    errors = json.loads(proc.stdout.strip().splitlines()[-1])["errors"]
    assert len(errors) == 3  # every DAG file imports the operators
    for error in errors.values():
        assert f"DREAMLINE_STORAGE={tmp_path / 'runs'}: in kubernetes mode it must be a remote URI" in error


def test_a_local_path_given_at_trigger_time_fails_the_task_before_any_pod(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from dreamline.operators import step_operator_class

    op = step_operator_class("kubernetes")(task_id="dataset", step="dataset", namespace="d", options={
        "repo": "/home/me/registry", "rev": "v1", "path": "dog", "output": "s3://b/run/dataset"})
    with pytest.raises(AirflowFailException, match=r"^dataset: --repo /home/me/registry is a path on this machine"):
        op.execute({})


def test_a_prompt_that_starts_like_a_path_is_text(tmp_path):
    """In kubernetes mode prompts are text: "/imagine a photo of sks dog" and "~dreamy~ photo" are not local paths
    (they were refused as such); the same start in a path option still is."""
    from dreamline.operators import local_paths

    options = {"instance_prompt": "/imagine a photo of sks dog", "class_prompt": "~dreamy~ photo of a dog",
               "prompts": ["/imagine a sks dog in snow", "./ a sks dog"], "class_prompts": ["~ a dog"],
               "template": "/ {instance_prompt}, {caption}", "reason": "/shrug", "output": "s3://b/run/caption"}
    assert local_paths(options) == []
    assert local_paths({**options, "report": "/home/me/validated"}) == [("report", "/home/me/validated")]


def container(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")


def mount(pod: dict, volume: str) -> str | None:
    return next((m["mountPath"] for m in container(pod)["volumeMounts"] if m["name"] == volume), None)


class FakeKubernetesApi:
    """The part of CoreV1Api that finding and creating a pod calls: the cluster is the one thing not run here."""

    def __init__(self, pods):
        from kubernetes.client import ApiClient

        self.pods, self.selectors, self.created, self.api_client = pods, [], [], ApiClient()

    def list_namespaced_pod(self, namespace, label_selector, **kwargs):
        self.selectors.append(label_selector)
        return SimpleNamespace(items=self.pods)

    def create_namespaced_pod(self, namespace, body, **kwargs):
        self.created.append(body)
        return body


def test_a_retried_task_reattaches_to_its_running_pod_and_keeps_failed_pods():
    from kubernetes.client import models as k8s

    from dreamline.operators import step_operator_class

    op = step_operator_class("kubernetes")(task_id="train", step="train", profile="gpu", namespace="dreamline",
                                           options={"output": "s3://b/run/train/lr-0.0001", "max_steps": 500})
    assert op.durable and op.on_finish_action.value == "delete_succeeded_pod"
    ti = SimpleNamespace(dag_id="lora_dog", task_id="train", map_index=1, try_number=2)
    context = {"ti": ti, "run_id": "scheduled__2026-11-23T02:00:00+00:00", "dag": SimpleNamespace()}
    request = op.build_pod_request_obj(context, dry_run=True)
    env = {e.name: e.value for e in request.spec.containers[0].env}
    assert re.search(r"/lora_dog/scheduled__2026-11-23T02_00_00_00_00-[0-9a-f]{10}/cost/train\.1\.try-2\.json$",
                     env["DREAMLINE_COST_RECORD"])
    first_try = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="sd-train-first", namespace="dreamline",
                                                    labels={**request.metadata.labels, "try_number": "1"}),
                          status=k8s.V1PodStatus(phase="Running"))
    api = FakeKubernetesApi([first_try])
    op.__dict__["client"] = api  # the operator's cached CoreV1Api

    assert op.get_or_create_pod(request, context) is first_try and api.created == []
    selector = api.selectors[0]
    assert {"dag_id=lora_dog", "task_id=train", "map_index=1"} <= set(selector.split(","))

    api.pods = []  # nothing running: the retry starts its own pod
    op.get_or_create_pod(request, context)
    assert [p["metadata"]["name"] for p in api.created] == [request.metadata.name]


@pytest.mark.parametrize("slots, pods", [("1", 1), ("2", 2), ("8", 4)])
def test_checkpoint_evaluations_are_shared_out_over_the_gpu_slots(tmp_path, slots, pods):
    """One evaluation process per GPU slot, never more than there is to evaluate: each loads SDXL and the evaluators
    once for all of its targets; every checkpoint of each rate, the champion and the base model is in exactly one."""
    settings = tmp_path / "dreamline.env"
    settings.write_text(SETTINGS.read_text().replace("DREAMLINE_GPU_SLOTS=4", f"DREAMLINE_GPU_SLOTS={slots}"))
    proc = pods_command(tmp_path, "--conf", json.dumps(CONF), settings=settings)
    assert proc.returncode == 0, proc.stderr
    evaluations = [doc for doc in yaml.safe_load_all(proc.stdout) if doc and container(doc)["args"][0] == "evaluate"
                   and any(a.startswith("--output=") and a.endswith("/eval") for a in container(doc)["args"])]
    targets = [[a.removeprefix("--targets=").split("=")[0] for a in container(doc)["args"]
                if a.startswith("--targets=")] for doc in evaluations]
    assert len(targets) == pods and all(targets)
    assert sorted(sum(targets, [])) == ["base", "champion-v1", "lr-0.0001", "lr-0.0005"]
    if pods == 2:  # the two training runs (two checkpoints each) apart, the single evaluations beside them
        assert sorted(len([t for t in group if t.startswith("lr-")]) for group in targets) == [1, 1]
