"""The Kubernetes deployment without a cluster: every object in deploy/kubernetes/ through the Kubernetes client's own
models; their names against plugins/dreamline/deployment.py and against the pods one DAG run launches (`make pods`);
the Role against the API calls KubernetesPodOperator makes; the Helm values against their ConfigMap and Secrets; the
commands of docs/deployment.md against all of these. Two of those commands run for real: the Git credentials against
loopback Git servers (through git and through DVC), and the warm-up Job's file selection against the steps' own
model loaders, offline."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import yaml

from conftest import REPO
from kubernetes_objects import (AIRFLOW_NAMESPACE, api_version_of, CREDENTIAL, DEPLOY, DOCS, documented_commands,
                                documented_secrets, GitServer, is_namespaced, job_pod, LITERAL_CREDENTIAL, manifests,
                                NODE_GROUP, OBJECTS, objects, one, restricted_violations, settings, tolerates,
                                VALUES, values)  # noqa: F401 (fixtures)
from test_pods import SETTINGS, container


def test_every_object_loads_into_the_kubernetes_client_model_of_its_kind(objects):
    from kubernetes.client import ApiClient

    client = ApiClient()
    for file, doc in objects:
        assert doc["apiVersion"] in api_version_of(doc["kind"]), f"{file}: {doc['apiVersion']} {doc['kind']}"
        model = doc["apiVersion"].rpartition("/")[2].capitalize() + doc["kind"]  # batch/v1 Job: V1Job
        loaded = client.deserialize(SimpleNamespace(data=json.dumps(doc)), model)  # required fields are checked
        # every key is one the model knows: a misspelt or misplaced field would be dropped on the way in
        assert client.sanitize_for_serialization(loaded) == doc, f"{file}: {doc['kind']} {doc['metadata']['name']}"


def test_the_objects_carry_the_names_the_deployment_defaults_to(objects, settings):
    from dreamline.deployment import from_environment

    defaults = from_environment({})
    assert (settings["DREAMLINE_NAMESPACE"], settings["DREAMLINE_SERVICE_ACCOUNT"], settings["DREAMLINE_CONFIGMAP"],
            settings["DREAMLINE_MODEL_CACHE_PVC"]) == (defaults.namespace, defaults.service_account,
                                                       defaults.configmap, defaults.model_cache_pvc)
    names = {(doc["kind"], doc["metadata"]["name"]) for _, doc in objects}
    assert {("Namespace", defaults.namespace), ("ServiceAccount", defaults.service_account),
            ("ConfigMap", defaults.configmap), ("PersistentVolumeClaim", defaults.model_cache_pvc)} <= names
    for file, doc in objects:
        if is_namespaced(doc["kind"]):
            assert doc["metadata"].get("namespace") == defaults.namespace, f"{file}: {doc['kind']}"


def test_the_pods_of_a_run_use_these_objects(objects, manifests):
    pvc, account, configmap = (one(objects, k)["metadata"]["name"] for k in
                               ("PersistentVolumeClaim", "ServiceAccount", "ConfigMap"))
    claims = set()
    for pod in manifests:
        spec = pod["spec"]
        assert pod["metadata"]["namespace"] == one(objects, "Namespace")["metadata"]["name"]
        assert spec["serviceAccountName"] == account
        assert {"configMapRef": {"name": configmap}} in container(pod)["envFrom"]
        claims |= {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc}
    warmup = job_pod(objects)
    assert {container(manifests[0])["image"]} == {c["image"] for c in warmup["containers"]}
    assert warmup["imagePullSecrets"] == manifests[0]["spec"]["imagePullSecrets"]


def test_gpu_pods_and_only_they_go_to_the_gpu_node_pool(manifests):
    group = yaml.safe_load(NODE_GROUP.read_text())
    [pool] = group["managedNodeGroups"]
    [gcloud] = [w for w in documented_commands() if w[:4] == ["gcloud", "container", "node-pools", "create"]]
    flags = dict(w.removeprefix("--").split("=", 1) for w in gcloud if w.startswith("--") and "=" in w)
    key, rest = flags["node-taints"].split("=", 1)
    gke_taint = {"key": key, "value": rest.split(":")[0], "effect": rest.split(":")[1]}
    gke_labels = dict(pair.split("=") for pair in flags["node-labels"].split(","))
    gpu_pods = [pod for pod in manifests if "nvidia.com/gpu" in container(pod)["resources"]["limits"]]
    assert gpu_pods and len(gpu_pods) < len(manifests)
    for labels, taints in ((pool["labels"], pool["taints"]), (gke_labels, [gke_taint])):
        assert taints == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
        for pod in manifests:
            fits = all(tolerates(pod["spec"].get("tolerations"), t) for t in taints)
            assert fits == (pod in gpu_pods), container(pod)["args"][0]  # CPU pods stay off the GPU nodes
            if pod in gpu_pods:
                assert pod["spec"]["nodeSelector"].items() <= labels.items()


def test_the_role_grants_the_scheduler_what_kubernetes_pod_operator_calls(objects, values):
    import airflow.providers.cncf.kubernetes as provider

    # The client calls of the operator and its pod manager (synchronous mode, the one Dreamline's tasks use), and
    # what each needs. A call not listed here is a provider change to look at: the test fails until it is.
    needs = {"create_namespaced_pod": {("pods", "create")}, "read_namespaced_pod": {("pods", "get")},
             "list_namespaced_pod": {("pods", "list")}, "patch_namespaced_pod": {("pods", "patch")},
             "delete_namespaced_pod": {("pods", "delete")}, "read_namespaced_pod_log": {("pods/log", "get")},
             "connect_get_namespaced_pod_exec": {("pods/exec", "get"), ("pods/exec", "create")},
             "list_namespaced_event": {("events", "list")}}
    root = Path(provider.__file__).parent
    calls = {m for f in ("operators/pod.py", "utils/pod_manager.py")
             for m in re.findall(r"\.(\w+_namespaced_\w+)\b", (root / f).read_text())}
    assert calls <= needs.keys(), f"calls the Role was not checked for: {calls - needs.keys()}"
    needed = set().union(*(needs[m] for m in calls)) | {("pods", "watch"), ("events", "watch")}
    role = one(objects, "Role")
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == needed  # all of it, and nothing more: no secrets, no wildcards
    binding = one(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    # LocalExecutor: tasks are processes of the scheduler, so the scheduler's account is the one that needs it
    assert values["executor"] == "LocalExecutor"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": values["scheduler"]["serviceAccount"]["name"],
                                    "namespace": AIRFLOW_NAMESPACE}]
    assert values["scheduler"]["serviceAccount"]["automountServiceAccountToken"] is True
    assert values["allowPodLaunching"] is False and values["multiNamespaceMode"] is False  # no broader grant


def test_the_configmap_holds_settings_the_pods_do_not_override(objects, manifests):
    data = one(objects, "ConfigMap")["data"]
    assert not [k for k in data if CREDENTIAL.search(k)]
    literal = {e["name"] for pod in manifests for e in container(pod)["env"]}
    assert not data.keys() & literal  # a pod's own env wins over envFrom: such a key would be silently ignored
    assert re.match(r"https?://[^/@]+$", data["AWS_ENDPOINT_URL_S3"]) and data["AWS_DEFAULT_REGION"]


def test_nothing_under_deploy_is_a_secret_or_holds_a_credential():
    def check_mapping(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and isinstance(node.get("value"), str) and node["value"]:
                assert not CREDENTIAL.search(node["name"]), f"{where}: env {node['name']} holds a literal"
            for key, value in node.items():
                names_a_secret = key.endswith(("Name", "name", "Names")) or key == "key"  # a taint's key
                if isinstance(value, str) and value and CREDENTIAL.search(key) and not names_a_secret:
                    raise AssertionError(f"{where}: {key} holds a literal")
                check_mapping(value, f"{where}.{key}")
        elif isinstance(node, list):
            for item in node:
                check_mapping(item, where)

    files = [p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts]  # not bytecode
    assert {VALUES, OBJECTS / "dreamline.env", NODE_GROUP} <= set(files)
    for path in files:
        text = path.read_text()
        assert not LITERAL_CREDENTIAL.search(text), path
        if path.suffix == ".yaml":
            for doc in yaml.safe_load_all(text):
                assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path
                check_mapping(doc, path.name)
        elif path.suffix == ".env":
            for key, value in (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#"):
                if CREDENTIAL.search(key):  # only DREAMLINE_*_SECRET(S): the names of Secrets
                    assert key.endswith(("_SECRET", "_SECRETS")), key
                    assert re.fullmatch(r"[a-z0-9-]*(,[a-z0-9-]+)*", value), key


def test_helm_values_take_settings_from_the_configmap_and_credentials_from_existing_secrets(values):
    secrets = documented_secrets()
    [configmap_command] = [w for w in documented_commands() if w[:2] == ["kubectl", "-n"] and "configmap" in w]
    assert configmap_command[2:6] == [AIRFLOW_NAMESPACE, "create", "configmap", "dreamline-settings"]
    # the settings Airflow gets are the ones `make pods` shows
    settings_file = configmap_command[6].removeprefix("--from-env-file=")
    assert settings_file == str(SETTINGS.relative_to(REPO))
    assert re.search(rf"^SETTINGS \?= {re.escape(settings_file)}$", (REPO / "Makefile").read_text(), re.M)
    assert yaml.safe_load(values["extraEnvFrom"]) == [{"configMapRef": {"name": "dreamline-settings"}},
                                                      {"secretRef": {"name": "dreamline-webhook", "optional": True}}]
    # the optional webhook connection (plugins/dreamline/notify.py): a Secret the docs create, in Airflow's namespace
    assert any(w[:6] == ["kubectl", "-n", AIRFLOW_NAMESPACE, "create", "secret", "generic"] and w[6] ==
               "dreamline-webhook" and "AIRFLOW_CONN_DREAMLINE_WEBHOOK" in " ".join(w) for w in documented_commands())
    # each credential of the chart: an existing Secret with the key the chart reads, created by the docs
    chart_keys = {values["data"]["metadataSecretName"]: "connection", values["fernetKeySecretName"]: "fernet-key",
                  values["apiSecretKeySecretName"]: "api-secret-key", values["jwtSecretName"]: "jwt-secret"}
    for name, key in chart_keys.items():
        assert name and secrets[(AIRFLOW_NAMESPACE, name)]["literals"].keys() == {key}, name
    for literal in ("fernetKey", "apiSecretKey", "jwtSecret", "webserverSecretKey"):
        assert values.get(literal) is None, literal
    assert "metadataConnection" not in values["data"] and "brokerUrl" not in values["data"]
    assert values["createUserJob"]["enabled"] is False  # its password would be a literal in values
    for name in values["imagePullSecrets"]:
        assert secrets[(AIRFLOW_NAMESPACE, name)]["type"] == "docker-registry"
    assert values["postgresql"]["enabled"] is False
    assert values["dags"]["gitSync"]["enabled"] is False and values["dags"]["persistence"]["enabled"] is False
    image = values["images"]["airflow"]
    assert image["repository"] and image["tag"] not in ("", "latest") and image["pullPolicy"] == "IfNotPresent"
    assert values["airflowVersion"] == version("apache-airflow")  # the Airflow the DAG is tested with


def test_the_documented_secrets_are_the_ones_the_pods_load(manifests, settings):
    secrets = documented_secrets()
    namespace = settings["DREAMLINE_NAMESPACE"]
    expected = {"dreamline-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                "dreamline-mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
                "dreamline-hf": {"HF_TOKEN"},
                "dreamline-git": {"GIT_CONFIG_COUNT", "GIT_CONFIG_KEY_0", "GIT_CONFIG_VALUE_0"}}
    loaded = {ref["secretRef"]["name"] for pod in manifests for ref in container(pod)["envFrom"] if "secretRef" in ref}
    assert loaded == expected.keys()
    for name, keys in expected.items():
        assert secrets[(namespace, name)]["type"] == "generic"
        assert secrets[(namespace, name)]["literals"].keys() == keys, name
    git = secrets[(namespace, "dreamline-git")]["literals"]
    assert int(git["GIT_CONFIG_COUNT"]) == len([k for k in git if k.startswith("GIT_CONFIG_KEY_")])
    for pull_secret in manifests[0]["spec"]["imagePullSecrets"]:
        assert secrets[(namespace, pull_secret["name"])]["type"] == "docker-registry"


def test_the_documented_git_credentials_reach_the_data_registry_and_no_other_host(tmp_path, settings):
    literals = documented_secrets()[(settings["DREAMLINE_NAMESPACE"], "dreamline-git")]["literals"]
    scope = re.fullmatch(r"http\.(.+)\.extraHeader", literals["GIT_CONFIG_KEY_0"]).group(1)
    assert settings["DREAMLINE_DATASET_REPO"].startswith(scope)  # scoped to the data registry's host
    registry, other = GitServer(), GitServer()
    token = "t0ken-for-the-test"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
           **{k: v.replace(scope, registry.base).replace("$GIT_TOKEN", token) for k, v in literals.items()},
           "HOME": str(tmp_path), "GIT_TERMINAL_PROMPT": "0", "PYTHONPATH": str(REPO)}
    subprocess.run(["git", "ls-remote", registry.base + "ml/registry.git"], env=env, capture_output=True)
    subprocess.run(["git", "ls-remote", other.base + "ml/registry.git"], env=env, capture_output=True)
    # the `dataset` step itself, which clones the data registry with DVC (through dulwich): it fails, after asking
    subprocess.run([sys.executable, "-m", "sd_tasks", "dataset", "--repo", registry.base + "ml/registry.git",
                    "--path", "dog", "--rev", "v1", "--output", str(tmp_path / "out")], env=env, capture_output=True,
                   timeout=300, cwd=tmp_path)
    assert len(registry.seen) >= 2 and set(registry.seen) == {f"Bearer {token}"}
    assert other.seen and set(other.seen) == {None}


def test_the_warmup_job_runs_like_a_step_pod(objects, manifests, settings):
    spec = job_pod(objects)
    [warmup] = spec["containers"]
    model_pods = [pod for pod in manifests if any("persistentVolumeClaim" in v for v in pod["spec"]["volumes"])]
    step = model_pods[0]
    assert spec["securityContext"] == step["spec"]["securityContext"]
    assert warmup["securityContext"] == container(step)["securityContext"]
    assert spec["serviceAccountName"] == step["spec"]["serviceAccountName"]
    assert spec["automountServiceAccountToken"] is False
    mounts = {m["name"]: m["mountPath"] for m in warmup["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[next(n for n, p in mounts.items() if p == "/tmp")]
    cache_mount = next(m for m in container(step)["volumeMounts"] if m["name"] == "model-cache")["mountPath"]
    [cache] = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert mounts[cache] == cache_mount
    env = {e["name"]: e["value"] for e in warmup["env"]}
    for pod in model_pods:  # every model step finds the files where the Job put them
        assert {e["name"]: e.get("value") for e in container(pod)["env"]}["HF_HOME"] == env["HF_HOME"]
    assert env["HF_HOME"].startswith(cache_mount + "/")
    assert warmup["command"] == ["python", "-m", "sd_tasks"] and warmup["args"][0] == "pin-models"  # a run's step
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in warmup["args"][1:])
    assert {flags[k.removeprefix("DREAMLINE_").lower().replace("_", "-")] for k in (
        "DREAMLINE_BASE_MODEL", "DREAMLINE_CLIP_MODEL", "DREAMLINE_DINO_MODEL", "DREAMLINE_CAPTION_MODEL")} == {
        settings[k] for k in ("DREAMLINE_BASE_MODEL", "DREAMLINE_CLIP_MODEL", "DREAMLINE_DINO_MODEL",
                              "DREAMLINE_CAPTION_MODEL")}
    assert not spec.get("tolerations") and not spec.get("nodeSelector")  # no GPU node for a download
    assert spec["restartPolicy"] == "Never"
    pvc = one(objects, "PersistentVolumeClaim")
    from kubernetes.utils import parse_quantity

    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several GPU nodes at once
    assert parse_quantity(pvc["spec"]["resources"]["requests"]["storage"]) >= parse_quantity("64Gi")


def test_every_pod_and_the_job_pass_the_restricted_pod_security_standard(objects, manifests):
    labels = one(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for spec in [pod["spec"] for pod in manifests] + [job_pod(objects)]:
        assert restricted_violations(spec) == [], spec["containers"][0]["name"]


def test_the_warmup_job_fetches_what_the_steps_load_and_not_the_rest(objects, models, tmp_path):
    """The Job's own command, against the tiny offline models served under its ids by a fake hub beside the big
    files real repositories also hold: it fetches none of those; then the steps' loaders, given the pinned ids with
    the hub gone, find every file in the cache the Job filled."""
    from fake_hub import UNUSED, FakeHub, folder_files

    warmup = job_pod(objects)["containers"][0]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in warmup["args"][1:])
    served = {"base-model": (models["sdxl"], "pipeline"), "vae": (Path(models["sdxl"]) / "vae", "model"),
              "clip-model": (models["clip"], "model"), "dino-model": (models["dino"], "model")}
    hub = FakeHub()
    for flag, (folder, kind) in served.items():
        hub.publish(flags[flag], folder_files(folder, UNUSED[kind]))
    argv = [sys.executable if word == "python" else word for word in warmup["command"]]
    argv += ["pin-models", *[f"--{flag}={flags[flag]}" for flag in served]]  # the captioner: not served here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env |= {k: v for k, v in one(objects, "ConfigMap")["data"].items() if k.startswith("HF_")}  # the pods' settings
    env |= {"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub.endpoint, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        pinned = json.loads(proc.stdout.splitlines()[-1])
        assert hub.downloads and not [f for f in hub.downloads if f.split("/", 2)[2] in sum(UNUSED.values(), [])]
    finally:
        hub.stop()
    load = "\n".join([
        "import sys",
        "from diffusers import DDPMScheduler",
        "from sd_tasks.evaluation import metrics",
        "from sd_tasks.models import loading as models",
        "from sd_tasks.models.model_refs import local_folder",
        "base, vae, clip, dino = sys.argv[1:]",
        "models.load_unet(base), models.load_vae(base), models.load_text_encoders(base)",  # encode, train
        "DDPMScheduler.from_pretrained(local_folder(base), subfolder='scheduler')",  # train's noise scheduler
        "models.load_pipeline(base, 'float32', vae=vae)",  # class-images, evaluate
        "metrics.ClipEmbedder(clip), metrics.DinoEmbedder(dino)",  # evaluate
    ])
    proc = subprocess.run([sys.executable, "-c", load, *(pinned[k] for k in ("base_model", "vae", "clip_model",
                                                                            "dino_model"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_docs_name_only_files_that_exist():
    text = DOCS.read_text()
    named = set(re.findall(r"\b((?:deploy|docs|plugins|tests|sd_tasks|dags)/[\w./-]+\.(?:yaml|env|py|md))", text))
    assert {"deploy/helm/values.yaml", "deploy/kubernetes/rbac.yaml", "deploy/eks/gpu-nodegroup.yaml"} <= named
    assert [n for n in sorted(named) if not (REPO / n).is_file()] == []
    applied = {w[i + 1] for w in documented_commands() if w[:2] == ["kubectl", "apply"]
               for i, word in enumerate(w) if word == "-f"}
    assert applied == {str(p.relative_to(REPO)) for p in OBJECTS.rglob("*.yaml")}  # every object gets applied


def test_the_local_stacks_ports_lie_outside_the_kernels_ephemeral_range():
    """A port free when chosen inside the ephemeral range can be taken by an outgoing connection before the service
    binds it: the reliability suite's stack once found its SeaweedFS gRPC port taken so."""
    from deploy.local.seaweedfs import GRPC_OFFSET, _ephemeral_ports, free_port_pairs

    low, high = _ephemeral_ports()
    for port in free_port_pairs(8):
        assert not low <= port <= high and not low <= port + GRPC_OFFSET <= high, port
