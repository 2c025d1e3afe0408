"""Retries that fit the error, in Airflow itself (`airflow dags test`): a step that refuses its input runs once, a
step that crashes is run again (dreamline.operators.STEP_RETRY_POLICY)."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

from conftest import REPO

PROBE_DAG = '''
from datetime import datetime, timedelta
from airflow.sdk import dag
from dreamline.operators import LocalStepOperator

FAST = {"retries": 1, "retry_delay": timedelta(0), "retry_exponential_backoff": False}

@dag(dag_id="retry_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
def retry_probe():
    # exit 65: the input folder does not exist
    LocalStepOperator(task_id="refused", step="validate", options={"input": "/nonexistent", "output": "/tmp/x"},
                      **FAST)
    # exit 1: the output's parent is a file (an OSError, as a full disk or a lost mount would be)
    LocalStepOperator(task_id="crashed", step="validate", options={"input": "IMAGES", "output": "/dev/null/out",
                                                                   "min_images": 1}, **FAST)

retry_probe()
'''


def test_a_refused_step_runs_once_and_a_crashed_one_is_retried(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (80, 80)).save(images / "a.png")
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "retry_probe.py").write_text(PROBE_DAG.replace("IMAGES", str(images)))
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "DREAMLINE_HOME": str(tmp_path / "home")}
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, cwd=REPO)
    proc = subprocess.run([*airflow, "dags", "test", "retry_probe"], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:
        tries = {t: (s, n) for t, s, n in db.execute("SELECT task_id, state, try_number FROM task_instance")}
    assert tries == {"refused": ("failed", 1), "crashed": ("failed", 2)}, (proc.stdout + proc.stderr)[-3000:]
