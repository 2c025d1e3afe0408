"""MLflow bookkeeping shared by the steps: where tracking goes, and runs found by key rather than created twice.

A pipeline run owns one parent MLflow run (keyed by the orchestrator's run id) and one nested run per learning
rate (keyed by parent and learning rate). Looking runs up by key first makes every step safe to retry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sd_tasks.cli import option
from sd_tasks.errors import StepError

RUN_KEY = "dreamline.run_key"


def state_home() -> Path:
    """All local state (MLflow, models, runs) lives under DREAMLINE_HOME, `.dreamline/` by default."""
    return Path(os.environ.get("DREAMLINE_HOME", ".dreamline")).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_home() / 'mlflow' / 'mlflow.db'}"


def client():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def experiment_id(name: str) -> str:
    """Get or create the experiment. With a sqlite store the artifacts go beside the database (MLflow's own default
    is ./mlruns under whatever the current directory happens to be)."""
    c = client()
    experiment = c.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    uri = tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return c.create_experiment(name, artifact_location=location)


def find_or_create_run(experiment: str, key: str, name: str, tags: dict | None = None,
                       parent_run_id: str | None = None) -> str:
    c = client()
    exp = experiment_id(experiment)
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_KEY}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {RUN_KEY: key, **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return c.create_run(exp, run_name=name, tags=tags).info.run_id


@dataclass
class StartRunConfig:
    """Open the MLflow parent run of one pipeline run (reused when it exists, so retries don't duplicate it)."""

    experiment: str = option("MLflow experiment name")
    run_key: str = option("unique key of the pipeline run, e.g. the Airflow dag_run id")
    run_name: str | None = option("display name of the run (default: the key)", None)
    tags: list[str] = option("extra tags as key=value", [])


def parse_tags(tags: list[str]) -> dict[str, str]:
    bad = [t for t in tags if "=" not in t]
    if bad:
        raise StepError(f"--tags {bad[0]!r}: tags are key=value")
    return dict(t.split("=", 1) for t in tags)


def run(config: StartRunConfig) -> dict:
    tags = parse_tags(config.tags)
    run_id = find_or_create_run(config.experiment, config.run_key, config.run_name or config.run_key, tags)
    return {"run_id": run_id, "experiment": config.experiment, "tracking_uri": tracking_uri()}


@dataclass
class EndRunConfig:
    """Close a run that is still RUNNING (a pipeline that stopped before `register`); leave a closed run alone."""

    run_id: str = option("MLflow run id")
    status: str = option("status for a run still RUNNING: FAILED or KILLED", "FAILED")


def end(config: EndRunConfig) -> dict:
    c = client()
    status = c.get_run(config.run_id).info.status
    if status == "RUNNING":
        c.set_terminated(config.run_id, config.status)
        status = config.status
    return {"run_id": config.run_id, "status": status}
