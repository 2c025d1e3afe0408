"""`make ui` (deploy/local/embedded.py) from nothing in a temp DREAMLINE_HOME: both UIs answer, the login works,
the gpu pool exists, the process count is bounded by the CPUs, and Ctrl-C leaves no process behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from conftest import REPO
from deploy.local.embedded import max_processes
from deploy.local.processes import leftovers
from deploy.local.seaweedfs import free_ports
from sd_tasks.images import usable_cpus

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
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    for name in ("MLFLOW_TRACKING_URI", "DREAMLINE_GPU_SLOTS"):
        env.pop(name, None)
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
