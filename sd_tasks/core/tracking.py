"""MLflow bookkeeping shared by the steps: where tracking goes, and runs found by key rather than created twice.

A pipeline run owns one parent MLflow run (keyed by the orchestrator's run id) and one nested run per learning
rate (keyed by parent and learning rate). Looking runs up by key first makes every step safe to retry.
Each evaluated checkpoint becomes a LoggedModel of its training run, carrying its scores (`log_checkpoint_model`),
so MLflow's model search ranks the whole sweep.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError, Unavailable

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


def version_by_alias(client, model_name: str, alias: str):
    """The model version `alias` points to, or None when the model is not registered or has no such alias. Only
    those mean "none": any other error (the tracking server unreachable, a refused credential) is raised, since
    taking it for "no model yet" would train a night from nothing, or leave a champion undefended."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # down, or refusing us: one line, exit 1, retried
            raise Unavailable(f"MLflow at {tracking_uri()}: {str(exc).splitlines()[0][:300]}") from None
        return None
    version = model.aliases.get(alias)
    return None if version is None else client.get_model_version(model_name, str(version))


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


CHECKPOINT_MODEL_TYPE = "lora-checkpoint"


def checkpoint_model_name(learning_rate: float, step: int) -> str:
    """`lr-0_0001-step-100`: the training run's folder name (`plan.run_name`) and the step. MLflow forbids `.` (and
    `/`, `:`, `%`, quotes) in a LoggedModel's name, so the learning rate's `.` becomes `_`; the exact value is the
    model's `learning_rate` param."""
    return f"lr-{learning_rate:g}-step-{step}".replace(".", "_")


def log_checkpoint_model(run_id: str, name: str | None = None, *, step: int, learning_rate: float, uri: str,
                         metrics: dict[str, float], params: dict | None = None, tags: dict | None = None,
                         prefix: str = "eval/") -> str:
    """Record one evaluated LoRA checkpoint as an MLflow LoggedModel of its training run and log its scores; return
    the model id. MLflow's model search and comparison (`search_logged_models`, the experiment's Models tab) then
    rank the checkpoints of the whole sweep by any of these metrics.

    The model (type `lora-checkpoint`, default name `checkpoint_model_name(learning_rate, step)`) is created in the
    run's experiment with `source_run_id=run_id`, params `learning_rate`, `step`, `checkpoint` (= `uri`) and
    `params`, tags `tags`; it is also logged as an output of the run at `step` (as `log_model` does), so the run
    lists it. Its weights stay at `uri`: no artifacts are copied into MLflow.

    Metrics: each `metrics[name]` is logged once as `<prefix><name>` (`eval/dino`, ...) at `step`, with the model's
    id. With a model id, MLflow writes the metric to the run's metric history AND to the model (one `log_batch`
    call, the same key, value, step and timestamp), so the run's charts and the model agree. This function is thus
    *the* place that logs these metrics to the run: a caller that also logs `eval/<name>` to the run itself would
    put a second entry at that step in the run's history.

    Safe to retry: the model is found by name and source run in the run's experiment before one is created, a
    param it already has is left alone, and a metric the run or the model already has at this step is not logged
    anew. Such a metric is re-logged as it was (its value and timestamp) with the model id, which is how MLflow's
    own `log_model` links a run's earlier metrics to a model: the store drops the exact duplicate, and whichever of
    run or model lacked it (a run that logged `eval/...` before this function existed, or an attempt interrupted
    between the two writes) gets it. So the run's history has one entry per metric and step, and when a retry
    scores differently the first value stands on both. Last, the model is finalized READY. Concurrent calls for
    the same checkpoint are not guarded against (a retry follows its failed attempt).
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.utils.time import get_current_time_millis

    c = client()
    run = c.get_run(run_id)
    name = name or checkpoint_model_name(learning_rate, step)
    model = _find_checkpoint_model(c, run.info.experiment_id, run_id, name)
    wanted_params = {"learning_rate": f"{learning_rate:g}", "step": str(step), "checkpoint": uri,
                     **{k: str(v) for k, v in (params or {}).items()}}
    if model is None:
        model = c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                      params=wanted_params, tags=tags, model_type=CHECKPOINT_MODEL_TYPE)
    else:
        if missing := {k: v for k, v in wanted_params.items() if k not in (model.params or {})}:
            c.log_model_params(model.model_id, missing)
        if tags:
            c.set_logged_model_tags(model.model_id, tags)
    model_id = model.model_id

    if not any(o.model_id == model_id for o in run.outputs.model_outputs):
        c.log_outputs(run_id, [LoggedModelOutput(model_id, step=step)])

    on_model = {(m.key, m.step): m for m in model.metrics or [] if m.run_id in (None, run_id)}
    batch = []
    now = get_current_time_millis()
    for metric, value in metrics.items():
        key = f"{prefix}{metric}"
        in_run = next((m for m in c.get_metric_history(run_id, key) if m.step == step), None)
        earlier = in_run or on_model.get((key, step))
        if in_run and (key, step) in on_model:
            continue
        batch.append(Metric(key, earlier.value if earlier else float(value), earlier.timestamp if earlier else now,
                            step, model_id=model_id, run_id=run_id))
    if batch:
        c.log_batch(run_id, metrics=batch)

    if model.status != LoggedModelStatus.READY:
        c.finalize_logged_model(model_id, LoggedModelStatus.READY)
    return model_id


def _find_checkpoint_model(c, experiment: str, run_id: str, name: str):
    """The oldest live LoggedModel of this name from this run, or None."""
    found = c.search_logged_models([experiment], filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
                                   order_by=[{"field_name": "creation_timestamp", "ascending": True}],
                                   max_results=1)
    return found[0] if found else None
