"""What the Kubernetes deployment consists of, read for the tests: the objects in deploy/kubernetes/, the pods one DAG
run launches (`make pods`), the deployment settings, the Helm values and the commands of docs/deployment.md; and a
loopback server that records what Git sends. Shared by test_deploy.py and test_deployment_names.py."""
from __future__ import annotations

import http.server
import json
import re
import shlex
import threading

import pytest
import yaml

from conftest import REPO
from test_pods import CONF, SETTINGS, pods_command

DEPLOY = REPO / "deploy"
OBJECTS = DEPLOY / "kubernetes"
VALUES = DEPLOY / "helm" / "values.yaml"
NODE_GROUP = DEPLOY / "eks" / "gpu-nodegroup.yaml"
DOCS = REPO / "docs" / "deployment.md"
AIRFLOW_NAMESPACE = "airflow"  # the Helm release's namespace (docs/deployment.md, values.yaml)
# A key that names a credential. Keys naming a Secret (…SecretName, DREAMLINE_*_SECRET) hold names, not credentials.
CREDENTIAL = re.compile(r"KEY|SECRET|PASS|TOKEN|CREDENTIAL", re.I)
# Credentials in any text: an AWS access key id, a private key, user:password@ in a URL.
LITERAL_CREDENTIAL = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|://[^/\s:@\"']+:[^/\s@\"']+@")
# The Kubernetes client's API classes and the apiVersion of the objects they create.
API_VERSIONS = {"CoreV1Api": "v1", "BatchV1Api": "batch/v1", "AppsV1Api": "apps/v1",
                "RbacAuthorizationV1Api": "rbac.authorization.k8s.io/v1"}


@pytest.fixture(scope="module")
def objects() -> list[tuple[str, dict]]:
    found = [(path.name, doc) for path in sorted(OBJECTS.glob("*.yaml"))
             for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert {doc["kind"] for _, doc in found} >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                                                 "PersistentVolumeClaim", "Job"}
    return found


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> list[dict]:
    """The pods of a run with every kind of step (prior preservation on), as `make pods` prints them."""
    proc = pods_command(tmp_path_factory.mktemp("pods"), "--conf", json.dumps(CONF))
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def settings() -> dict[str, str]:
    from dreamline.pods import read_settings

    return read_settings(str(SETTINGS))


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def one(objects, kind: str) -> dict:
    [doc] = [doc for _, doc in objects if doc["kind"] == kind]
    return doc


def job_pod(objects) -> dict:
    return one(objects, "Job")["spec"]["template"]["spec"]


def api_version_of(kind: str) -> set[str]:
    """The apiVersions whose API class in the Kubernetes client can create this kind."""
    from kubernetes import client

    method = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()
    return {api_version for cls, api_version in API_VERSIONS.items()
            for name in (f"create_namespaced_{method}", f"create_{method}") if hasattr(getattr(client, cls), name)}


def is_namespaced(kind: str) -> bool:
    from kubernetes import client

    method = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()
    return any(hasattr(getattr(client, cls), f"create_namespaced_{method}") for cls in API_VERSIONS)


def documented_commands() -> list[list[str]]:
    """Every command line of the docs' bash blocks, continuation lines joined, split as the shell would."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def documented_secrets() -> dict[tuple[str, str], dict]:
    """{(namespace, name): {"type": ..., "literals": {key: value}, "files": {key: path}}} of the docs' `kubectl create
    secret` commands; a command inside `for ns in A B; do ... done` counts once per namespace."""
    found, loop = {}, {}
    for words in documented_commands():
        if words[0] == "for" and words[2] == "in":
            loop = {"$" + words[1]: [w.rstrip(";") for w in words[3:words.index("do")]]}
        elif words[0] == "done":
            loop = {}
        elif words[:1] == ["kubectl"] and "secret" in words and "create" in words:
            namespace = words[words.index("-n") + 1]
            kind, name = words[words.index("secret") + 1: words.index("secret") + 3]
            literals = dict(w.removeprefix("--from-literal=").split("=", 1) for w in words
                            if w.startswith("--from-literal="))
            files = dict(w.removeprefix("--from-file=").split("=", 1) for w in words if w.startswith("--from-file="))
            for ns in loop.get(namespace, [namespace]):
                found[(ns, name)] = {"type": kind, "literals": literals, "files": files}
    return found


def tolerates(tolerations: list[dict] | None, taint: dict) -> bool:
    """Kubernetes' rule: a toleration matches a taint by key (or an empty key with Exists), by value unless the
    operator is Exists, and by effect unless its effect is empty."""
    for t in tolerations or []:
        key_ok = t.get("key") == taint["key"] or (not t.get("key") and t.get("operator") == "Exists")
        value_ok = t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", "")
        effect_ok = not t.get("effect") or t["effect"] == taint["effect"]
        if key_ok and value_ok and effect_ok:
            return True
    return False


def restricted_violations(spec: dict) -> list[str]:
    """What the Pod Security Standard "restricted" (the `dreamline` namespace enforces it) would refuse."""
    found = []
    pod = spec.get("securityContext", {})
    if any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        found.append("host namespaces")
    allowed = {"name", "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
               "projected", "secret"}
    found += [f"volume {v['name']}: {sorted(set(v) - allowed)}" for v in spec.get("volumes", []) if set(v) - allowed]
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or \
                set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities")
        as_root = sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True
        if as_root or sc.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{c['name']}: may run as root")
        if sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccomp")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{c['name']}: hostPort")
    return found


class GitServer:
    """A loopback HTTP server that records the Authorization header of each request and answers 404."""

    def __init__(self):
        self.seen = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.headers.get("Authorization"))
                self.send_response(404)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
