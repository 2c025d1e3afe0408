"""`make ui`: the Airflow UI (airflow standalone) and the MLflow UI over the embedded state, until Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

AIRFLOW_PORT, MLFLOW_PORT = 8080, 5000


def main() -> int:
    home = Path(os.environ["DREAMLINE_HOME"])
    airflow_home = Path(os.environ["AIRFLOW_HOME"])
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    logs = home / "ui-logs"
    logs.mkdir(parents=True, exist_ok=True)
    # standalone starts its components as `airflow ...` commands: the venv's bin must be on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "AIRFLOW__API__PORT": str(AIRFLOW_PORT), "PATH": path}
    procs = [
        subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env,
                         stdout=open(logs / "airflow.log", "w"), stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking,
                          "--host", "127.0.0.1", "--port", str(MLFLOW_PORT)],
                         stdout=open(logs / "mlflow.log", "w"), stderr=subprocess.STDOUT),
    ]
    passwords = airflow_home / "simple_auth_manager_passwords.json.generated"
    for _ in range(120):
        if passwords.exists() or any(p.poll() is not None for p in procs):
            break
        time.sleep(1)
    login = json.loads(passwords.read_text()) if passwords.exists() else {}
    print(f"Airflow UI: http://localhost:{AIRFLOW_PORT}  login: "
          + (", ".join(f"{u} / {p}" for u, p in login.items()) or f"see {logs / 'airflow.log'}"))
    print(f"MLflow UI:  http://localhost:{MLFLOW_PORT}")
    print(f"Logs in {logs}. Ctrl-C stops both.", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
