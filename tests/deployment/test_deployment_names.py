"""The names the deployment files share, against one source: the defaults of plugins/dreamline/deployment.py (the
`Deployment` dataclass and `from_environment`) and the pool `GPU_POOL` of plugins/dreamline/profiles.py.

Read here: docker-compose.yaml (interpolated with .env.example's values, and with its own fallbacks), .env.example,
every object in deploy/kubernetes/*.yaml, deploy/kubernetes/dreamline.env, deploy/helm/values.yaml and the commands of
docs/deployment.md, with the loaders of tests/deployment/test_compose.py and tests/deployment/test_deploy.py. Each setting goes through
`from_environment`, the code that reads it in Airflow, so a file is checked by what the DAG would do with it. Not
repeated here: the names of the objects themselves and dreamline.env's namespace, account, ConfigMap and PVC
(test_deploy), the pods' references (test_deploy, from `make pods`) and the compose file's shape (test_compose)."""
from __future__ import annotations

import re
import shlex
from datetime import timedelta

import pytest

from test_compose import AIRFLOW_COMPONENTS, environment, example_env, interpolate, raw  # noqa: F401
from kubernetes_objects import DOCS, documented_commands, job_pod, objects, settings, values  # noqa: F401

# Deployment's fields that name an object in the cluster, and the settings that override them.
NAMES = {"namespace": "DREAMLINE_NAMESPACE", "service_account": "DREAMLINE_SERVICE_ACCOUNT",
         "configmap": "DREAMLINE_CONFIGMAP", "s3_secret": "DREAMLINE_S3_SECRET",
         "optional_secrets": ("DREAMLINE_MLFLOW_SECRET", "DREAMLINE_HF_SECRET", "DREAMLINE_GIT_SECRET"),
         "model_cache_pvc": "DREAMLINE_MODEL_CACHE_PVC", "image_pull_secrets": "DREAMLINE_IMAGE_PULL_SECRETS"}
NAME_SETTINGS = {s for v in NAMES.values() for s in ((v,) if isinstance(v, str) else v)}
# Registry credentials are the one name without a default (a public registry needs none): every file that names
# them names the same Secret, and a file that leaves them out gets the default, none.
PULL_SECRETS = "image_pull_secrets"
INIT = "airflow-init"


def names(env: dict) -> dict:
    """The object names a Deployment read from these settings uses."""
    from dreamline.deployment import from_environment

    deployment = from_environment({k: v for k, v in env.items() if v is not None})
    return {field: getattr(deployment, field) for field in NAMES}


@pytest.fixture(scope="module")
def defaults() -> dict:
    return names({})


def compose_env(raw, env: dict) -> dict[str, dict]:
    """{service: its environment} of every Airflow service of docker-compose.yaml, interpolated with `env`."""
    services = interpolate(raw, env)["services"]
    return {name: environment(services[name]) for name in (*AIRFLOW_COMPONENTS, INIT)}


def repository(image: str) -> str:
    """An image reference without its tag or digest (a registry's port stays)."""
    registry_and_path, _, name = image.split("@", 1)[0].rpartition("/")
    return "/".join(filter(None, [registry_and_path, name.split(":", 1)[0]]))


def test_compose_and_env_example_name_the_objects_of_deploy_kubernetes(raw, example_env, defaults, settings):
    # .env.example's values, then compose's own fallbacks (${VAR:-fallback}) where .env leaves a name out
    for how, env in ((".env.example", example_env),
                     ("compose's fallbacks", {k: v for k, v in example_env.items() if k not in NAME_SETTINGS})):
        for service, service_env in compose_env(raw, env).items():
            found = names(service_env)
            assert found == {**defaults, PULL_SECRETS: found[PULL_SECRETS]}, f"docker-compose.yaml, {service}, {how}"
            assert found[PULL_SECRETS] in (defaults[PULL_SECRETS], names(settings)[PULL_SECRETS]), f"{service}, {how}"


def test_dreamline_env_names_the_default_secrets(settings, defaults):
    found = names(settings)
    assert (found["s3_secret"], found["optional_secrets"]) == (defaults["s3_secret"], defaults["optional_secrets"])


def test_the_warmup_job_refers_to_the_default_objects(objects, defaults, settings):
    """The Job is the one object that refers to others (the pods do too, and test_deploy checks them)."""
    spec = job_pod(objects)
    assert spec["serviceAccountName"] == defaults["service_account"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v] == \
        [defaults["model_cache_pvc"]]
    for container in spec["containers"]:
        for ref in container.get("envFrom", []):
            if "configMapRef" in ref:
                assert ref["configMapRef"]["name"] == defaults["configmap"]
            else:
                name = ref["secretRef"]["name"]
                assert name in (defaults["s3_secret"], *defaults["optional_secrets"]), name
                assert ref["secretRef"].get("optional", False) == (name in defaults["optional_secrets"]), name
    assert tuple(s["name"] for s in spec["imagePullSecrets"]) == names(settings)[PULL_SECRETS]


def test_one_registry_and_one_pull_secret_for_both_images(objects, settings, values, example_env):
    pull = names(settings)[PULL_SECRETS]
    assert pull and tuple(values["imagePullSecrets"]) == pull  # the Airflow pods' copy, in namespace airflow
    worker = repository(settings["DREAMLINE_IMAGE"])
    assert {repository(c["image"]) for c in job_pod(objects)["containers"]} == {worker}
    assert repository(example_env["DREAMLINE_IMAGE"]) == worker
    built = {w[w.index("--target") + 1]: repository(w[w.index("-t") + 1]) for w in documented_commands()
             if w[:2] == ["docker", "build"]}
    assert built == {"worker": worker, "airflow": values["images"]["airflow"]["repository"]}
    assert values["defaultAirflowRepository"] == values["images"]["airflow"]["repository"]
    # the pull secret is for the one registry both images come from
    [server] = {w[i].removeprefix("--docker-server=") for w in documented_commands() if "docker-registry" in w
                for i in range(len(w)) if w[i].startswith("--docker-server=")}
    assert {worker.split("/")[0], values["images"]["airflow"]["repository"].split("/")[0]} == {server}


def pools_set(command: list[str]) -> list[list[str]]:
    """The `airflow pools set ...` argv (from `pools` on) of each command in a `bash -c` script or a kubectl exec."""
    if command[:2] in (["bash", "-c"], ["sh", "-c"]):
        lexer = shlex.shlex(command[2], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, commands = list(lexer), [[]]
        for word in words:
            if word in ("&&", ";", "||"):
                commands.append([])
            else:
                commands[-1].append(word)
    else:
        commands = [command[command.index("--") + 1:]] if "--" in command else [command]
    return [c[1:] for c in commands if c[:3] == ["airflow", "pools", "set"]]


def parse_airflow(argv: list[str]):
    from airflow.cli.cli_parser import get_parser

    return get_parser().parse_args(argv)  # Airflow's own CLI: an unknown flag or a bad slot count exits


def test_every_place_that_creates_the_gpu_pool_creates_the_one_the_gpu_steps_use(raw, example_env, settings):
    from deploy.local.pools import GPU_POOL as LOCAL_POOL
    from dreamline.profiles import GPU_POOL, PROFILES

    assert {p.pool for p in PROFILES.values() if p.gpus} == {GPU_POOL} == {LOCAL_POOL}
    # compose's init: after the migration, every start, with DREAMLINE_GPU_SLOTS slots (default 1, as the local
    # tools), deferred tasks counted
    for env, slots in (({k: v for k, v in example_env.items() if k != "DREAMLINE_GPU_SLOTS"}, 1),
                       (example_env, int(example_env.get("DREAMLINE_GPU_SLOTS", 1)))):
        init = interpolate(raw, env)["services"][INIT]
        created = pools_set(init["command"])
        assert len(created) == 1, f"{INIT} does not create pool {GPU_POOL!r}: {init['command']}"
        args = parse_airflow(created[0])
        assert (args.pool, args.slots, args.include_deferred) == (GPU_POOL, slots, True), created[0]
        script = init["command"][2]
        assert script.index("airflow db migrate") < script.index("airflow pools set")
    # the command docs/deployment.md gives for Kubernetes, as large as the slots the DAG shares evaluations over
    [argv] = [a for command in documented_commands() for a in pools_set(command)]
    args = parse_airflow(argv)
    assert (args.pool, args.include_deferred) == (GPU_POOL, True), argv
    assert args.slots == int(settings["DREAMLINE_GPU_SLOTS"])


def test_the_docs_figures_are_the_codes_and_the_values(values):
    """Retries, time limits and concurrency in docs/deployment.md, as the code and deploy/helm/values.yaml set them."""
    from dreamline.operators import STEP_RETRIES
    from dreamline.profiles import DEFAULT_TIMEOUT, PROFILES, STEP_TIMEOUTS

    text = " ".join(DOCS.read_text().split())
    figures = {"max_active_tasks_per_dag": values["config"]["core"]["max_active_tasks_per_dag"],
               "parallelism": values["config"]["core"]["parallelism"], "retries": STEP_RETRIES["retries"]}
    for key, wanted in figures.items():
        found = re.findall(rf"`{key}: (\d+)`", text)
        assert found and {int(n) for n in found} == {wanted}, key
    startup = {int(m) for m in re.findall(r"(\d+)-minute startup timeout", text)}
    assert startup == {PROFILES["gpu"].startup_timeout_seconds // 60}
    # "... (`STEP_TIMEOUTS` in `plugins/dreamline/profiles.py`): train 8 h; encode, evaluate and confirm 3 h; ...;
    # every other step 30 minutes"
    limits = re.search(r"`STEP_TIMEOUTS` in `plugins/dreamline/profiles.py`\): (.*?); every other step (\d+) min", text)
    assert limits, "docs/deployment.md: the steps' time limits"
    documented = {}
    for group in limits[1].split("; "):
        steps, hours = re.fullmatch(r"(.+) (\d+) h", group).groups()
        steps = re.sub(r" \(.*?\)", "", steps)  # "pin-models (the `models` task)": the step's name
        documented |= {step: timedelta(hours=int(hours)) for step in re.split(r", | and ", steps)}
    assert documented.pop("confirm") == documented["evaluate"]  # confirm runs the evaluate step
    assert (documented, timedelta(minutes=int(limits[2]))) == (STEP_TIMEOUTS, DEFAULT_TIMEOUT)
