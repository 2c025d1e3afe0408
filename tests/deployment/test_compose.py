"""docker-compose.yaml: valid against the Compose Specification's own JSON schema once interpolated the way Compose
does it (with .env.example's values), and free of secret defaults: every secret comes from .env through ${VAR:?...},
ports are published on 127.0.0.1 only, every long-running service has a health check, state lives in named
volumes, and the preflight service refuses .env.example's placeholders. No Docker engine needed."""
from __future__ import annotations

import copy
import importlib.resources
import json
import re
import secrets
import subprocess

import jsonschema
import pytest
import yaml
from dotenv import dotenv_values

from conftest import REPO

COMPOSE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
# A variable or environment key whose value is a secret...
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
# ...but for these, which name Kubernetes Secrets (objects in the cluster), not hold one.
SECRET_OBJECT_NAMES = {"DREAMLINE_S3_SECRET", "DREAMLINE_MLFLOW_SECRET", "DREAMLINE_IMAGE_PULL_SECRETS"}
# Compose's interpolation syntax: $$, $VAR, ${VAR}, ${VAR:-x}, ${VAR-x}, ${VAR:?x}, ${VAR?x}, ${VAR:+x}, ${VAR+x}.
REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|"
                       r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})")
# Kubernetes-mode settings the Airflow side reads (plugins/dreamline/deployment.py).
KUBERNETES_SETTINGS = {"DREAMLINE_EXECUTOR", "DREAMLINE_STORAGE", "DREAMLINE_CACHE", "DREAMLINE_DATASET_REPO",
                       "MLFLOW_TRACKING_URI", "DREAMLINE_IMAGE", "DREAMLINE_NAMESPACE", "DREAMLINE_SERVICE_ACCOUNT",
                       "DREAMLINE_IMAGE_PULL_POLICY", "DREAMLINE_IMAGE_PULL_SECRETS", "DREAMLINE_CONFIGMAP",
                       "DREAMLINE_S3_SECRET", "DREAMLINE_MLFLOW_SECRET", "DREAMLINE_MODEL_CACHE_PVC"}
AIRFLOW_COMPONENTS = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")


class MissingVariable(Exception):
    pass


def interpolate_string(text: str, env: dict[str, str | None]) -> str:
    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["bare"] or match["name"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset, empty = value is None, not value
        missing = empty if op and op.startswith(":") else unset
        if op in (":-", "-"):
            return arg if missing else value
        if op in (":?", "?"):
            if missing:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return value
        if op in (":+", "+"):
            return "" if missing else arg
        return value or ""

    return REFERENCE.sub(replace, text)


def interpolate(node, env: dict[str, str | None]):
    """Compose interpolates every string value of the model (extension fields included), never a key."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if isinstance(node, str):
        return interpolate_string(node, env)
    return node


def strings(node):
    """Every string value in the model, uninterpolated."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def references(node) -> list[re.Match]:
    return [m for text in strings(node) for m in REFERENCE.finditer(text) if not m["escaped"]]


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and name not in SECRET_OBJECT_NAMES


def environment(service: dict) -> dict:
    env = service.get("environment", {})
    return dict(item.split("=", 1) if "=" in item else (item, None) for item in env) if isinstance(env, list) else env


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved, as Compose does


@pytest.fixture(scope="module")
def example_env() -> dict:
    return dotenv_values(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def model(raw, example_env) -> dict:
    return interpolate(raw, example_env)


@pytest.fixture(scope="module")
def schema() -> dict:
    # The Compose Specification's schema (compose-spec/compose-spec, schema/compose-spec.json) as vendored by
    # check-jsonschema, the pinned package its `check-compose-spec` hook validates with.
    path = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(path.read_text())


def schema_errors(schema: dict, document: dict) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_schema_is_the_compose_specification(schema):
    assert schema["title"] == "Compose Specification"
    assert {"services", "volumes", "configs"} <= set(schema["properties"])
    jsonschema.validators.validator_for(schema).check_schema(schema)


def test_compose_file_is_valid_against_the_compose_spec_schema(schema, model):
    assert schema_errors(schema, model) == []


def misspelt_service_key(model):
    model["services"]["mlflow"]["helthcheck"] = model["services"]["mlflow"].pop("healthcheck")


def misspelt_healthcheck_key(model):
    model["services"]["postgres"]["healthcheck"]["intervall"] = "10s"


def unknown_depends_on_condition(model):
    model["services"]["mlflow"]["depends_on"]["s3"]["condition"] = "service_healty"


def misspelt_top_level_key(model):
    model["volume"] = model.pop("volumes")


def port_as_a_mapping_of_the_wrong_shape(model):
    model["services"]["s3"]["ports"] = [{"host": "127.0.0.1", "target": 8333}]


@pytest.mark.parametrize("mistake", [misspelt_service_key, misspelt_healthcheck_key, unknown_depends_on_condition,
                                     misspelt_top_level_key, port_as_a_mapping_of_the_wrong_shape])
def test_the_schema_catches_a_real_mistake(schema, model, mistake):
    broken = copy.deepcopy(model)
    mistake(broken)
    assert schema_errors(schema, broken), f"the schema accepted {mistake.__name__}"


def test_env_example_defines_every_variable_compose_uses_and_no_other(raw, example_env):
    used = {m["bare"] or m["name"] for m in references(raw)}
    assert used - set(example_env) == set(), "used by docker-compose.yaml, missing from .env.example"
    assert set(example_env) - used == set(), "in .env.example, used nowhere"


def test_every_secret_comes_from_env_without_a_default(raw):
    secret_refs = [m for m in references(raw) if is_secret(m["bare"] or m["name"])]
    assert len({m["name"] for m in secret_refs}) >= 11
    offending = sorted({m[0] for m in secret_refs if m["op"] != ":?"})
    assert offending == [], "a secret with a default or without :? (compose would start without it)"
    for m in secret_refs:
        assert f"set {m['name']} in .env" in m["arg"], m[0]  # the error message says what to do


def test_a_missing_secret_stops_compose_with_a_clear_message(raw, example_env):
    env = {**example_env, "AIRFLOW_FERNET_KEY": ""}
    with pytest.raises(MissingVariable, match=r"AIRFLOW_FERNET_KEY.*set AIRFLOW_FERNET_KEY in \.env"):
        interpolate(raw, env)


def test_no_literal_secret_in_any_environment_or_url(raw):
    whole_reference = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]*\}")
    for name, service in raw["services"].items():
        for key, value in environment(service).items():
            if is_secret(key):
                assert isinstance(value, str) and whole_reference.fullmatch(value), f"{name}: {key}={value!r}"
    # user:password@host in any connection URL: the password part must be a required reference.
    for text in strings(raw):
        for password in re.findall(r"://[^/:@\s]+:([^@\s]+)@", text):
            assert whole_reference.fullmatch(password), text


def test_env_file_is_git_ignored_and_the_example_is_not():
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=REPO).returncode == 1


def one_shot(service: dict) -> bool:
    return service.get("restart") == "no"


def test_every_long_running_service_has_a_health_check(model):
    long_running = [name for name, s in model["services"].items() if not one_shot(s)]
    assert set(AIRFLOW_COMPONENTS) | {"postgres", "s3", "mlflow"} <= set(long_running)
    for name in long_running:
        test = model["services"][name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"


def test_depends_on_waits_for_health_or_completion(model):
    services = model["services"]
    waited_for = set()
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on without conditions"
        for other, how in depends_on.items():
            assert other in services, f"{name} depends on unknown {other}"
            wanted = "service_completed_successfully" if one_shot(services[other]) else "service_healthy"
            assert how["condition"] == wanted, f"{name} -> {other}"
            waited_for.add(other)
    assert {n for n, s in services.items() if one_shot(s)} <= waited_for  # no init step left unwaited
    # Nothing starts before the secrets passed the preflight check: it is the one service that waits for none.
    assert [n for n, s in services.items() if not s.get("depends_on")] == ["preflight"]


def test_published_ports_bind_loopback_only(model):
    published = {}
    for name, service in model["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                parts = str(port).rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond this host"
            published[name] = port
    assert set(published) == {"airflow-apiserver", "mlflow", "s3"}


def test_state_lives_in_declared_named_volumes(model):
    declared = set(model["volumes"])
    used = set()
    for name, service in model["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                if volume["type"] == "volume":
                    used.add(volume["source"])
                else:
                    assert volume["type"] == "bind" and volume.get("read_only") is True, f"{name}: {volume}"
            else:
                source = volume.split(":", 1)[0]
                assert not source.startswith(("/", ".", "~")), f"{name}: bind mount {volume}"
                used.add(source)
    assert used == declared
    assert {"postgres-data", "s3-data", "airflow-logs"} <= declared


def test_airflow_runs_steps_as_pods_with_the_kubernetes_settings(model, raw):
    for name in AIRFLOW_COMPONENTS + ("airflow-init",):
        service = model["services"][name]
        assert service["build"]["target"] == "airflow"
        env = environment(service)
        assert KUBERNETES_SETTINGS <= set(env), name
        assert env["DREAMLINE_EXECUTOR"] == "kubernetes"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    # The kubeconfig, read-only, where the KubernetesPodOperator's connection points, and only where pods start.
    kube = json.loads(environment(model["services"]["airflow-scheduler"])["AIRFLOW_CONN_KUBERNETES_DEFAULT"])
    for name in AIRFLOW_COMPONENTS:
        mounts = [v for v in model["services"][name].get("volumes", []) if isinstance(v, dict)]
        if name in ("airflow-scheduler", "airflow-triggerer"):
            assert mounts == [{"type": "bind", "source": "/etc/dreamline/kubeconfig",
                               "target": kube["extra"]["kube_config_path"], "read_only": True}]
        else:
            assert mounts == []
    assert model["services"]["mlflow"]["build"]["target"] == "mlflow"


def test_mlflow_uses_postgres_s3_and_basic_auth(model):
    mlflow = model["services"]["mlflow"]
    args = dict(arg.split("=", 1) for arg in mlflow["command"][2:])
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert args["--app-name"] == "basic-auth"
    assert args["--backend-store-uri"].startswith("postgresql+psycopg2://mlflow@postgres:5432/")
    assert args["--artifacts-destination"] == "s3://dreamline/mlflow"
    auth_ini = model["configs"]["mlflow-auth"]["content"]
    assert "database_uri = postgresql+psycopg2://mlflow@postgres:5432/mlflow_auth" in auth_ini
    assert "admin_password" not in auth_ini  # from the environment (.env), never from a file here
    assert environment(mlflow)["MLFLOW_AUTH_CONFIG_PATH"] == mlflow["configs"][0]["target"]
    # The init service creates both databases the server uses.
    sql = model["configs"]["postgres-init"]["content"]
    assert "CREATE DATABASE mlflow OWNER mlflow" in sql and "CREATE DATABASE mlflow_auth OWNER mlflow" in sql


def run_preflight(model, secret_values: dict[str, str]) -> subprocess.CompletedProcess:
    preflight = model["services"]["preflight"]
    env = {key: secret_values.get(key.removeprefix("SECRET_"), value)
           for key, value in environment(preflight).items()}
    assert preflight["command"][:2] == ["sh", "-c"]
    return subprocess.run(preflight["command"], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True)


def test_preflight_covers_every_secret(raw, model):
    checked = {key.removeprefix("SECRET_") for key in environment(model["services"]["preflight"])}
    secret_vars = {m["bare"] or m["name"] for m in references(raw) if is_secret(m["bare"] or m["name"])}
    assert checked == secret_vars


def test_preflight_refuses_the_placeholders_and_short_secrets_and_passes_generated_ones(model):
    names = [key.removeprefix("SECRET_") for key in environment(model["services"]["preflight"])]
    placeholders = run_preflight(model, {})
    assert placeholders.returncode == 1
    assert sorted(line.split()[1] for line in placeholders.stderr.splitlines()) == sorted(names)
    assert "still the placeholder of .env.example" in placeholders.stderr

    generated = {name: secrets.token_urlsafe(32) for name in names}
    passed = run_preflight(model, generated)
    assert (passed.returncode, passed.stderr) == (0, "")

    short = run_preflight(model, {**generated, "S3_ACCESS_KEY": "abc123"})
    assert short.returncode == 1
    assert short.stderr.strip() == "error: S3_ACCESS_KEY in .env is shorter than 16 characters"
