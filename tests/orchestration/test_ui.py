"""`make ui` (deploy/local/embedded.py) from nothing in a temp DREAMLINE_HOME: both UIs answer, the login works,
the gpu pool exists, the process count is bounded by the CPUs, a subject added as the README's "Your own subject on
your own GPU" says is trained to a registered champion, and Ctrl-C leaves no process behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from conftest import FOUR_PROMPTS, REPO, tree_snapshot
from deploy.local.embedded import max_processes
from deploy.local.processes import leftovers
from deploy.local.seaweedfs import free_ports
from sd_tasks.data.images import usable_cpus

pytestmark = pytest.mark.ui
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, token: str | None = None, data: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    with _NO_PROXY.open(request, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    home = tmp_path_factory.mktemp("ui-home")
    airflow_port, mlflow_port = free_ports(2)
    env = {**os.environ, "DREAMLINE_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DREAMLINE_SUBJECTS": str(home / "subjects.yaml"),
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}  # no night starts when a DAG is unpaused here
    for name in ("MLFLOW_TRACKING_URI", "DREAMLINE_GPU_SLOTS", "DREAMLINE_MODELS", "DREAMLINE_BASE_MODEL",
                 "DREAMLINE_CLIP_MODEL", "DREAMLINE_DINO_MODEL", "HF_HUB_OFFLINE"):
        env.pop(name, None)
    subject = add_the_readmes_subject(home, env)
    output = home / "ui.out"
    began = time.monotonic()
    with open(output, "w") as out:
        launcher = subprocess.Popen([sys.executable, str(REPO / "scripts" / "ui.py"), "--airflow-port",
                                     str(airflow_port), "--mlflow-port", str(mlflow_port)], env=env, cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        while "Ctrl-C stops both" not in output.read_text():
            assert launcher.poll() is None, output.read_text()
            assert time.monotonic() - began < 300, output.read_text()
            time.sleep(1)
        root = psutil.Process(launcher.pid)
        yield {"home": home, "launcher": launcher, "output": output, "up_s": time.monotonic() - began,
               "subject": subject,
               "tree": [root, *root.children(recursive=True)],
               "airflow": f"http://127.0.0.1:{airflow_port}", "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            try:
                launcher.wait(timeout=90)
            except subprocess.TimeoutExpired:
                launcher.kill()
        for process in leftovers(home / "ui"):  # only when a test failed: the launcher should have ended them
            process.kill()


def test_both_uis_answer_with_the_printed_login(ui):
    assert get(f"{ui['airflow']}/api/v2/monitor/health")["metadatabase"]["status"] == "healthy"
    assert _NO_PROXY.open(f"{ui['mlflow']}/health", timeout=10).status == 200
    text = ui["output"].read_text()
    password = json.loads((ui["home"] / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
    assert f"login: admin / {password['admin']}" in text
    token = get(f"{ui['airflow']}/auth/token", data={"username": "admin", "password": password["admin"]})
    pool = get(f"{ui['airflow']}/api/v2/pools/gpu", token=token["access_token"])
    assert (pool["slots"], pool["include_deferred"]) == (1, True)


def test_the_process_count_is_sized_to_the_cpus(ui):
    cpus = usable_cpus()
    names = [p.name() for p in ui["tree"] if p.is_running()]
    assert len(names) <= max_processes(cpus), names
    assert sum("LocalExecutor" in name for name in names) == cpus, names
    assert f"sized to {cpus} CPUs: parallelism {cpus}" in ui["output"].read_text()


def readme_commands() -> list[str]:
    """The commands of the README's "Your own subject on your own GPU"."""
    section = (REPO / "README.md").read_text().split("## Your own subject on your own GPU", 1)[1].split("\n## ")[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def add_the_readmes_subject(home, env) -> dict:
    """The section's first command as written, with a copy of the sample photos as the user's folder."""
    commands = readme_commands()
    assert [c.split()[:2] for c in commands] == [["make", "subject"], ["DREAMLINE_MODELS=hub", "make"]], commands
    words = dict(w.split("=", 1) for w in commands[0].split()[2:])
    assert set(words) == {"NAME", "PHOTOS", "TOKEN", "CLASS", "KIND"}
    photos = home / "my-photos"
    shutil.copytree(REPO / "sample_data" / "dog", photos)
    shutil.copy(REPO / "dags" / "subjects.yaml", home / "subjects.yaml")
    argv = ["make", "-s", "subject", *[f"{k}={photos if k == 'PHOTOS' else v}" for k, v in words.items()]]
    before = tree_snapshot(photos)
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tree_snapshot(photos) == before  # the user's photos are copied, never touched
    return {**words, "output": proc.stdout}


def subject_dag(ui) -> tuple[str, str]:
    """The REST API URL of the README subject's DAG, once the dag-processor has parsed it, and a token."""
    password = json.loads((ui["home"] / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
    token = get(f"{ui['airflow']}/auth/token", data={"username": "admin", "password": password["admin"]})
    token = token["access_token"]
    dag = f"{ui['airflow']}/api/v2/dags/lora_{ui['subject']['NAME']}"
    deadline = time.monotonic() + 180
    while True:
        try:
            get(dag, token=token)
            return dag, token
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline, "the subject's DAG never appeared"
            time.sleep(3)


@pytest.mark.parametrize("conf, said", [
    ({"max_step": 300}, "max_step: not a setting of this DAG; did you mean max_steps?"),
    ({"max_steps": 300, "learning_rate": [1e-4]}, "learning_rate: not a setting of this DAG; did you mean "
                                                   "learning_rates?"),
    ({"zzz": 1}, "zzz: not a setting of this DAG (nothing")])
def test_the_api_refuses_a_trigger_with_a_setting_the_dag_does_not_know(ui, conf, said):
    """Airflow accepts any conf key; Dreamline's plugin on the API server (dreamline.trigger_guard) answers 400 with
    the closest setting before a run exists. The UI's form posts to this same endpoint."""
    dag, token = subject_dag(ui)
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"{dag}/dagRuns", token=token, data={"logical_date": None, "conf": conf})
    assert refused.value.code == 400
    assert json.load(refused.value)["detail"].startswith(said)
    assert get(f"{dag}/dagRuns", token=token)["total_entries"] == 0


def test_your_own_subject_as_the_readme_says(ui):
    """After `make subject`, `make ui` (here with the tiny models: no GPU) shows DAG lora_<NAME>; a triggered run
    (at demo size, and a margin the random evaluators can clear) ends with a registered champion in MLflow."""
    name = ui["subject"]["NAME"]
    assert f"Subject {name!r} added to" in ui["subject"]["output"]
    dag, token = subject_dag(ui)
    patch(dag, token, {"is_paused": False})
    conf = {"learning_rates": [1e-4], "max_steps": 2, "checkpointing_steps": 2, "resolution": 64,
            "images_per_prompt": 1, "inference_steps": 2, "confirmation_inference_steps": 2,
            "evaluation_prompts": FOUR_PROMPTS, "confirmation_images_per_prompt": 1, "promotion_margin": -10}
    run = get(f"{dag}/dagRuns", token=token, data={"logical_date": None, "conf": conf})
    deadline = time.monotonic() + 900
    while (state := get(f"{dag}/dagRuns/{run['dag_run_id']}", token=token)["state"]) not in ("success", "failed"):
        assert time.monotonic() < deadline, "the run did not end in 15 minutes"
        time.sleep(5)
    assert state == "success"
    model = get(f"{ui['mlflow']}/api/2.0/mlflow/registered-models/get?name={name}-sdxl-lora")["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]}.get("champion") == "1"


def patch(url: str, token: str, data: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(data).encode(), method="PATCH",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with _NO_PROXY.open(request, timeout=10) as response:
        return json.loads(response.read())


def test_ctrl_c_stops_everything(ui):
    launcher, tree = ui["launcher"], ui["tree"]
    began = time.monotonic()
    launcher.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the launcher
    assert launcher.wait(timeout=90) == 0, ui["output"].read_text()
    stopped = time.monotonic() - began
    time.sleep(1)
    left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left and not leftovers(ui["home"] / "ui"), [p.cmdline() for p in left]
    print(f"make ui: up in {ui['up_s']:.0f} s, stopped in {stopped:.0f} s")
