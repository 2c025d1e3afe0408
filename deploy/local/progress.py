"""Per-task progress of a DAG run while it goes on, read from Airflow's metadata database.

`make demo` runs its DAG with `airflow dags test` in a subprocess whose output goes to a log file; this prints one
line per task instance as it ends: task, map index (the map_index_template's name when there is one), state,
seconds. The source is the database's task_instance table, read-only, rather than the `dags test` output:

- every task instance's end lands there with its state, dates, duration and rendered map index, whoever ended it:
  the task itself through the Execution API, or, for the skipped and upstream_failed ones, which never run and so
  never log a line, the task that skipped them or the scheduling loop;
- the output has no line that carries the state and the duration together (`[DAG TEST] end task task_id=...
  map_index=...` has neither), and its wording is not an interface: log lines change between releases, where
  these columns of task_instance and dag_run have stayed since Airflow 2.9 (rendered_map_index is the newest);
  tests/orchestration/test_e2e.py reads them off a real run's database, so a schema change fails there;
- `dags test` runs the DAG with a run id of its own making: the run is found as the DAG's first one created after
  the watcher, which notes the DAG's last run before the subprocess starts.

SQLite is opened read-only (`mode=ro`); Airflow keeps it in WAL mode, so a reader does not hold up its writer.
A poll that fails (the database busy a moment) returns nothing and the next one catches up.
"""
from __future__ import annotations

import configparser
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy
import sqlalchemy.exc
import sqlalchemy.pool
from sqlalchemy import text

# The states a task instance ends an attempt in; up_for_retry ends one attempt and another follows.
ENDED = ("success", "failed", "skipped", "upstream_failed", "removed", "up_for_retry")

_ROWS = text("""
    SELECT ti.run_id, ti.task_id, ti.map_index, ti.rendered_map_index, ti.state, ti.try_number,
           ti.start_date, ti.end_date, ti.duration
    FROM task_instance ti JOIN dag_run dr ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id
    WHERE ti.dag_id = :dag_id AND dr.id > :after AND ti.state IN :states
    ORDER BY ti.end_date, ti.task_id, ti.map_index
""").bindparams(sqlalchemy.bindparam("states", expanding=True))
_RUNNING = text("""
    SELECT ti.task_id, ti.map_index, ti.rendered_map_index, ti.start_date
    FROM task_instance ti JOIN dag_run dr ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id
    WHERE ti.dag_id = :dag_id AND dr.id > :after AND ti.state = 'running'
    ORDER BY ti.start_date, ti.task_id, ti.map_index
""")
_LAST_RUN = text("SELECT COALESCE(MAX(id), 0) FROM dag_run WHERE dag_id = :dag_id")


@dataclass(frozen=True)
class TaskEnd:
    task_id: str
    map_index: int
    label: str | None  # the rendered map_index_template
    state: str
    try_number: int
    seconds: float | None

    @property
    def name(self) -> str:
        if self.map_index < 0:
            return self.task_id
        return f"{self.task_id} [{self.label or self.map_index}]"

    def line(self) -> str:
        seconds = "-" if self.seconds is None else f"{self.seconds:.1f} s"
        retry = f" (try {self.try_number})" if self.try_number > 1 else ""
        return f"  {self.name + retry:<34} {self.state:<15} {seconds:>8}"


class RunWatcher:
    """The task ends of the runs of `dag_id` created after the run with id `after` (default: the DAG's last run
    now, so create the watcher before the run starts), as they happen: poll()."""

    def __init__(self, database_url: str, dag_id: str, after: int | None = None):
        self.dag_id, self.engine = dag_id, read_only_engine(database_url)
        self.seen: set[tuple] = set()
        self.error: str | None = None
        if after is None:
            with self.engine.connect() as db:
                after = db.execute(_LAST_RUN, {"dag_id": dag_id}).scalar_one()
        self.after = after

    @classmethod
    def for_airflow(cls, dag_id: str, env: dict[str, str] | None = None) -> RunWatcher:
        return cls(airflow_database_url(os.environ if env is None else env), dag_id)

    def poll(self) -> list[TaskEnd]:
        """The task instances that ended since the last poll, in the order they ended."""
        try:
            with self.engine.connect() as db:
                rows = db.execute(_ROWS, {"dag_id": self.dag_id, "after": self.after, "states": list(ENDED)}).all()
        except sqlalchemy.exc.SQLAlchemyError as exc:  # busy, or mid-migration: the next poll catches up
            self.error = str(exc).splitlines()[0]
            return []
        ended = []
        for run_id, task_id, map_index, label, state, try_number, start, end, duration in rows:
            key = (run_id, task_id, map_index, try_number, state)
            if key not in self.seen:
                self.seen.add(key)
                ended.append(TaskEnd(task_id, map_index, label, state, try_number, seconds(duration, start, end)))
        return ended

    def running(self) -> list[tuple[str, float]]:
        """(name, seconds since it started) of each task instance running now."""
        try:
            with self.engine.connect() as db:
                rows = db.execute(_RUNNING, {"dag_id": self.dag_id, "after": self.after}).all()
        except sqlalchemy.exc.SQLAlchemyError as exc:
            self.error = str(exc).splitlines()[0]
            return []
        now = datetime.now(timezone.utc)
        return [(TaskEnd(task_id, map_index, label, "running", 1, None).name, (now - as_utc(start)).total_seconds())
                for task_id, map_index, label, start in rows if start is not None]

    def close(self) -> None:
        self.engine.dispose()


def seconds(duration: float | None, start, end) -> float | None:
    """The duration Airflow recorded, else end - start."""
    if duration is not None:
        return float(duration)
    if start is None or end is None:
        return None
    return (as_utc(end) - as_utc(start)).total_seconds()


def as_utc(date: datetime | str) -> datetime:
    """A date from the database as an aware datetime: SQLite hands back text, in UTC without an offset."""
    date = datetime.fromisoformat(date) if isinstance(date, str) else date
    return date if date.tzinfo else date.replace(tzinfo=timezone.utc)


def airflow_database_url(env: dict[str, str]) -> str:
    """Where Airflow's metadata lives, as Airflow resolves it: AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, else
    [database] sql_alchemy_conn in AIRFLOW_HOME/airflow.cfg, else AIRFLOW_HOME/airflow.db."""
    if url := env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        return url
    home = Path(env.get("AIRFLOW_HOME") or Path.home() / "airflow")
    config = configparser.ConfigParser(interpolation=None)
    config.read(home / "airflow.cfg")
    return config.get("database", "sql_alchemy_conn", fallback=None) or f"sqlite:///{home / 'airflow.db'}"


def read_only_engine(url: str) -> sqlalchemy.Engine:
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not path.exists():
            raise FileNotFoundError(f"no Airflow database at {path}")
        return sqlalchemy.create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5),
            poolclass=sqlalchemy.pool.NullPool)
    return sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
