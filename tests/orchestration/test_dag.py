"""The DAG parses cleanly, cheaply (no ML imports) and has the shape the issue asks for."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "peft", "accelerate", "mlflow") if m in sys.modules)
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dags), "heavy": heavy}))
"""


def airflow_env(tmp_path, **extra) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "DREAMLINE_HOME": str(tmp_path / "home"), **extra}


def kubernetes_settings() -> dict:
    """The example settings of a kubernetes deployment (deploy/kubernetes/dreamline.env)."""
    lines = (REPO / "deploy" / "kubernetes" / "dreamline.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


@pytest.mark.parametrize("executor", ["local", "kubernetes"])
def test_dagbag_imports_without_errors_or_ml_libraries(tmp_path, executor):
    # Outside the repo, as Airflow's own components run it: only the dags and plugins folders are on the path.
    settings = kubernetes_settings() if executor == "kubernetes" else {"DREAMLINE_EXECUTOR": "local"}
    proc = subprocess.run([sys.executable, "-c", PARSE, str(REPO / "dags")], capture_output=True, text=True,
                          env=airflow_env(tmp_path, **settings), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"errors": {}, "heavy": [],
                   "dags": ["batch_images", "lora_backpack", "lora_dog"] + (["publish_dataset"] if executor == "local"
                                                                            else [])}


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="module")
def dag(bag):
    return bag.dags["lora_dog"]


def test_schedule_and_run_policy(dag, bag):
    # dog: nightly at 02:00 or when a new dataset version is published; backpack: nightly only
    assert dag.timetable.timetable.expression == "0 2 * * *"
    assert [a.uri for a in dag.timetable.asset_condition.objects] == ["dreamline://datasets/dog"]
    assert bag.dags["lora_backpack"].timetable.expression == "30 2 * * *"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.dagrun_timeout.total_seconds() == 20 * 3600  # a hung night fails before the next begins
    assert dag.doc_md and dag.doc_md.lstrip().startswith("### SDXL DreamBooth-LoRA")


def test_every_param_has_a_type_title_description_and_section(dag):
    params = dag.params
    wanted = {"force", "subject", "instance_prompt", "class_prompt", "dataset_version", "learning_rates",
              "max_steps", "checkpointing_steps", "rank", "train_text_encoder", "resolution", "base_model",
              "evaluation_prompts"}
    assert wanted <= set(params.keys())
    for name in params.keys():
        schema = params.get_param(name).schema
        assert schema.get("type") and schema.get("title") and schema.get("section"), name
        assert len(params.get_param(name).description or "") > 10, name
    assert params["learning_rates"] == [1e-4, 5e-4, 1e-5]
    assert (params["max_steps"], params["checkpointing_steps"]) == (500, 100)
    assert params["train_text_encoder"] is False  # opt-in: slower steps, more memory


def test_each_subject_gets_its_registry_entry_as_its_form_defaults(dag, bag):
    backpack = bag.dags["lora_backpack"].params
    assert (dag.params["subject"], dag.params["instance_prompt"], dag.params["subject_kind"]) == \
        ("dog", "a photo of sks dog", "live")
    assert (backpack["subject"], backpack["instance_prompt"], backpack["class_prompt"], backpack["subject_kind"]) == \
        ("backpack", "a photo of zwx backpack", "a photo of backpack", "object")
    assert backpack["learning_rates"] == [1e-4, 5e-4]  # the entry's recipe over the production default


def test_training_and_evaluation_are_mapped_over_learning_rates_with_halving_rungs(dag):
    tasks = dag.task_dict
    rungs = {f"rung_{n}.{t}" for n in (1, 2) for t in ("halving", "halve", "kept_training_runs", "train",
                                                          "new_checkpoint_evaluations", "evaluate")}
    assert {"recipe", "models_to_pin", "models", "dataset", "champion", "lineage", "anything_to_train", "mlflow_run", "validate", "caption",
            "resize", "encode_shards", "encode", "cache_to_merge", "merge_cache", "prior_preservation_on",
            "class_images", "encode_class_images", "training_runs", "train", "checkpoint_evaluations", "evaluate",
            "select", "confirmations", "confirm", "register", "approval_needed", "approval", "promote",
            "close_mlflow_run", *rungs} == set(tasks)
    assert tasks["close_mlflow_run"].is_teardown and "promote" in tasks["close_mlflow_run"].upstream_task_ids
    assert tasks["train"].__class__.__name__ == "MappedOperator"
    assert tasks["evaluate"].__class__.__name__ == "MappedOperator"
    assert tasks["encode"].__class__.__name__ == "MappedOperator"
    assert {"merge_cache", "encode_class_images"} <= tasks["training_runs"].upstream_task_ids
    assert tasks["training_runs"].trigger_rule == "none_failed"  # runs when prior preservation is skipped
    # the winner, the champion and the base model: one process, one pipeline (dreamline.plan.confirmation_options)
    assert tasks["confirm"].__class__.__name__ != "MappedOperator" and tasks["confirm"].step == "evaluate"
    assert tasks["register"].upstream_task_ids == {"confirm"}
    assert tasks["select"].upstream_task_ids == {"evaluate", "rung_1.evaluate", "rung_2.evaluate"}
    # each rung follows the stage before it, and is skipped (from its first task on) when the sweep has no such rung
    assert {"train", "evaluate"} <= tasks["rung_1.halving"].upstream_task_ids
    assert {"rung_1.train", "rung_1.evaluate"} <= tasks["rung_2.halving"].upstream_task_ids
    assert tasks["rung_1.train"].__class__.__name__ == "MappedOperator"
    assert tasks["promote"].upstream_task_ids == {"approval"} and tasks["approval"].defaults == ["Reject"]
    assert tasks["select"].trigger_rule == "all_done"  # from the evaluations that succeeded, whichever rungs ran


def test_the_first_tasks_decide_before_any_gpu_work(dag):
    tasks = dag.task_dict
    assert tasks["recipe"].upstream_task_ids == set()
    assert tasks["dataset"].upstream_task_ids == tasks["champion"].upstream_task_ids == {"recipe"}
    assert tasks["anything_to_train"].upstream_task_ids == {"lineage", "champion"}  # champion fails early
    # every hub model is pinned before lineage compares the base model: a hub that cannot be reached fails here
    assert tasks["models"].upstream_task_ids == {"recipe", "models_to_pin"}
    assert "models" in tasks["lineage"].upstream_task_ids
    downstream = tasks["anything_to_train"].get_flat_relative_ids(upstream=False)
    gpu = {t.task_id for t in dag.tasks if getattr(t, "pool", None) == "gpu"}
    assert gpu == {"encode", "class_images", "encode_class_images", "train", "evaluate", "confirm",
                   *(f"rung_{n}.{t}" for n in (1, 2) for t in ("train", "evaluate"))}
    assert gpu <= downstream


def test_gpu_steps_take_gpu_pool_slots_and_every_step_has_a_time_limit_and_retries(dag):
    for task in dag.tasks:
        step = getattr(task, "step", None) or getattr(task, "partial_kwargs", {}).get("step")
        if step is None:
            continue  # a TaskFlow task, seconds of Python in Airflow
        assert task.execution_timeout is not None, task.task_id
        assert task.retries == 2 and task.retry_exponential_backoff, task.task_id
        assert task.retry_policy is not None, task.task_id
    assert dag.task_dict["train"].pool == "gpu" and dag.task_dict["train"].pool_slots == 1
    assert dag.task_dict["train"].execution_timeout.total_seconds() == 8 * 3600
    assert dag.task_dict["register"].pool == "default_pool"


def test_approval_shows_registers_review_and_a_silent_reviewer_keeps_the_champion(dag):
    from datetime import timedelta
    from types import SimpleNamespace

    approval = dag.task_dict["approval"]
    assert approval.defaults == ["Reject"] and approval.options == ["Approve", "Reject"]
    assert approval.response_timeout == timedelta(hours=10)  # the registry's default: half the run's 20 h
    registered = {"version": 3, "review": "# dog-sdxl-lora ...\n\n![grid](http://mlflow/get-artifact?...)"}
    ti = SimpleNamespace(xcom_pull=lambda task_ids, **_: registered if task_ids == "register" else None)
    rendered = approval.render_template({"subject": approval.subject, "body": approval.body},
                                        {"ti": ti, "params": {}}, dag.get_template_env())
    assert rendered == {"subject": "Promote dog-sdxl-lora v3 to champion?", "body": registered["review"]}
    # nothing waits unless register says the version earned promotion and a reviewer is required
    assert dag.task_dict["approval_needed"].downstream_task_ids == {"approval"}
    assert dag.task_dict["promote"].upstream_task_ids == {"approval"}


def test_the_approval_wait_ends_inside_the_runs_time_limit(dag, monkeypatch):
    """Training and evaluation took 15 of the run's 20 hours: a 10-hour wait would outlast the run (which would then
    fail instead of keeping the champion), so the wait is cut to end before the limit; early, the full wait."""
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from airflow.providers.standard.operators.hitl import ApprovalOperator

    from dreamline.approval import END_MARGIN, SHORTEST, approval_window

    approval = dag.task_dict["approval"]
    assert dag.dagrun_timeout == timedelta(hours=20) and approval.response_timeout == timedelta(hours=10)
    waits = []
    monkeypatch.setattr(ApprovalOperator, "execute", lambda self, context: waits.append(self.response_timeout))
    now = datetime.now(timezone.utc)
    for started in (now - timedelta(hours=15), now - timedelta(hours=1)):
        task = approval.__class__.__new__(approval.__class__)
        task.__dict__.update(approval.__dict__)  # a fresh copy per try, as a worker deserialises one
        task.execute({"dag_run": SimpleNamespace(start_date=started), "dag": dag})
    assert timedelta(hours=5) - END_MARGIN - timedelta(minutes=1) < waits[0] <= timedelta(hours=5) - END_MARGIN
    assert waits[1] == timedelta(hours=10)
    # past the limit already: still a short wait, never a negative one; no limit: as configured
    assert approval_window(timedelta(hours=10), now - timedelta(hours=30), timedelta(hours=20), now) == SHORTEST
    assert approval_window(timedelta(hours=10), now, None, now) == timedelta(hours=10)
