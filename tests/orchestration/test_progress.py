"""`make demo`'s per-task progress (deploy/local/progress.py), replaying the task instances of a real demo run
(tests/orchestration/data/demo_task_instances.json) into an SQLite database shaped like Airflow's, as `airflow dags test` writes
them: each poll reports what ended since the last one, once, in order. tests/orchestration/test_e2e.py checks the same reader
against the database of a real `airflow dags test` run."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from deploy.local.progress import RunWatcher, airflow_database_url

DATA = Path(__file__).parent / "data" / "demo_task_instances.json"
DAG = "sdxl_dreambooth_lora"


@pytest.fixture
def database(tmp_path):
    """The two tables and the columns the watcher reads, in WAL mode as Airflow keeps its SQLite database, with
    an earlier run of the DAG and a run of another DAG whose task instances must not be reported."""
    path = tmp_path / "airflow.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=wal")
    db.execute("CREATE TABLE dag_run (id INTEGER PRIMARY KEY, dag_id TEXT, run_id TEXT)")
    db.execute("CREATE TABLE task_instance (dag_id TEXT, run_id TEXT, task_id TEXT, map_index INTEGER, "
               "rendered_map_index TEXT, state TEXT, try_number INTEGER, start_date TEXT, end_date TEXT, "
               "duration REAL)")
    for run_id, dag_id in (("earlier", DAG), ("other", "another_dag")):
        db.execute("INSERT INTO dag_run (dag_id, run_id) VALUES (?, ?)", (dag_id, run_id))
        db.execute("INSERT INTO task_instance VALUES (?, ?, 'dataset', -1, NULL, 'success', 1, "
                   "'2026-11-22 10:00:00', '2026-11-22 10:00:01', 1.0)", (dag_id, run_id))
    yield path, db
    db.close()


def captured() -> list[dict]:
    data = json.loads(DATA.read_text())
    return [dict(zip(data["columns"], row)) for row in data["rows"]]


def add_run(db: sqlite3.Connection, run_id: str, rows: list[dict]) -> None:
    """The run as `dags test` starts it: every task instance there, none started."""
    db.execute("INSERT INTO dag_run (dag_id, run_id) VALUES (?, ?)", (DAG, run_id))
    for row in rows:
        db.execute("INSERT INTO task_instance (dag_id, run_id, task_id, map_index, state, try_number) "
                   "VALUES (?, ?, ?, ?, NULL, 0)", (DAG, run_id, row["task_id"], row["map_index"]))


def set_row(db: sqlite3.Connection, run_id: str, row: dict) -> None:
    db.execute("UPDATE task_instance SET rendered_map_index = ?, state = ?, try_number = ?, start_date = ?, "
               "end_date = ?, duration = ? WHERE run_id = ? AND task_id = ? AND map_index = ?",
               (row["rendered_map_index"], row["state"], row["try_number"], row["start_date"], row["end_date"],
                row["duration"], run_id, row["task_id"], row["map_index"]))


def test_each_task_instance_of_the_new_run_is_reported_once_as_it_ends(database):
    path, db = database
    watcher = RunWatcher(f"sqlite:///{path}", DAG)  # before the run, as the demo creates it
    rows = captured()
    add_run(db, "manual__demo", rows)
    assert watcher.poll() == []
    lines = []
    for i, row in enumerate(rows):
        set_row(db, "manual__demo", {**row, "state": "running", "end_date": None, "duration": None})
        if row["task_id"] == "train" and row["map_index"] == 1:
            [(name, seconds)] = watcher.running()
            assert name == "train [lr=0.0005]" and seconds > 0
        set_row(db, "manual__demo", row)
        if i % 4 == 0:  # several ends between two polls come out together, in order
            lines += [end.line() for end in watcher.poll()]
    lines += [end.line() for end in watcher.poll()]
    assert watcher.poll() == [] and watcher.error is None
    assert len(lines) == len(rows) == 27
    assert lines[0].split() == ["class_images", "skipped", "0.0", "s"]  # never ran: its end is its start
    assert lines[1].split() == ["prior_preservation_on", "success", "2.9", "s"]
    assert lines[10].split() == ["encode", "[shard", "0]", "success", "5.6", "s"]
    assert [line.split()[:2] for line in lines if line.split()[0] == "train"] == [
        ["train", "[lr=0.0001]"], ["train", "[lr=0.0005]"], ["train", "[lr=1e-05]"]]
    assert lines[14] == "  train [lr=0.0001]                  success           11.8 s"
    assert lines[-1].split() == ["close_mlflow_run", "success", "3.9", "s"]


def test_a_retried_task_reports_each_attempt_and_a_duration_from_its_dates(database):
    path, db = database
    watcher = RunWatcher(f"sqlite:///{path}", DAG)
    row = {"task_id": "evaluate", "map_index": 2, "rendered_map_index": "lr-0.0005/step-10"}
    add_run(db, "manual__retry", [row])
    set_row(db, "manual__retry", {**row, "state": "up_for_retry", "try_number": 1,
                                  "start_date": "2026-11-23 17:00:00", "end_date": "2026-11-23 17:00:04.5",
                                  "duration": None})
    [first] = watcher.poll()
    set_row(db, "manual__retry", {**row, "state": "success", "try_number": 2, "start_date": "2026-11-23 17:01:00",
                                  "end_date": "2026-11-23 17:01:10", "duration": 10.0})
    [second] = watcher.poll()
    assert first.line().split() == ["evaluate", "[lr-0.0005/step-10]", "up_for_retry", "4.5", "s"]
    assert second.line().split() == ["evaluate", "[lr-0.0005/step-10]", "(try", "2)", "success", "10.0", "s"]


def test_it_reads_without_writing_or_waiting_for_the_writer(database):
    path, db = database
    watcher = RunWatcher(f"sqlite:///{path}", DAG)
    add_run(db, "manual__busy", captured()[:1])
    db.execute("BEGIN IMMEDIATE")  # `dags test` in the middle of a write
    db.execute("UPDATE task_instance SET state = 'skipped' WHERE run_id = 'manual__busy'")
    assert watcher.poll() == [] and watcher.error is None  # the last committed state, at once
    db.execute("COMMIT")
    assert [end.state for end in watcher.poll()] == ["skipped"]
    with pytest.raises(Exception, match="readonly"), watcher.engine.connect() as connection:
        connection.exec_driver_sql("DELETE FROM task_instance")


def test_the_database_is_found_as_airflow_finds_it(tmp_path):
    assert airflow_database_url({"AIRFLOW_HOME": str(tmp_path)}) == f"sqlite:///{tmp_path / 'airflow.db'}"
    (tmp_path / "airflow.cfg").write_text("[database]\nsql_alchemy_conn = sqlite:////elsewhere/airflow.db\n")
    assert airflow_database_url({"AIRFLOW_HOME": str(tmp_path)}) == "sqlite:////elsewhere/airflow.db"
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://db/airflow"}
    assert airflow_database_url(env) == "postgresql://db/airflow"
    with pytest.raises(FileNotFoundError):
        RunWatcher(f"sqlite:///{tmp_path / 'missing.db'}", DAG)
