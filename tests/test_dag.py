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
    assert out == {"errors": {}, "dags": ["sdxl_dreambooth_lora"], "heavy": []}


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags")).dags["sdxl_dreambooth_lora"]


def test_schedule_and_run_policy(dag):
    assert dag.timetable.expression == "0 2 * * *"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.doc_md and dag.doc_md.lstrip().startswith("### SDXL DreamBooth-LoRA")


def test_trigger_form_params_are_typed_titled_and_sectioned(dag):
    params = dag.params
    wanted = {"subject", "instance_prompt", "class_prompt", "dataset_version", "learning_rates", "max_steps",
              "checkpointing_steps", "rank", "resolution", "base_model", "evaluation_prompts"}
    assert wanted <= set(params.keys())
    for name in params.keys():
        schema = params.get_param(name).schema
        assert schema.get("type") and schema.get("title") and schema.get("section"), name
    assert params["learning_rates"] == [1e-4, 5e-4, 1e-5]
    assert (params["max_steps"], params["checkpointing_steps"]) == (500, 100)


def test_training_is_mapped_over_learning_rates_and_evaluation_over_checkpoints(dag):
    tasks = dag.task_dict
    assert {"mlflow_run", "dataset", "validate", "caption", "resize", "encode_shards", "encode", "cache_to_merge",
            "merge_cache", "prior_preservation_on", "class_images", "encode_class_images", "training_runs", "train", "champion",
            "checkpoint_evaluations", "evaluate", "select", "register", "close_mlflow_run"} == set(tasks)
    assert tasks["close_mlflow_run"].is_teardown and "register" in tasks["close_mlflow_run"].upstream_task_ids
    assert tasks["train"].__class__.__name__ == "MappedOperator"
    assert tasks["evaluate"].__class__.__name__ == "MappedOperator"
    assert tasks["encode"].__class__.__name__ == "MappedOperator"
    assert {"merge_cache", "encode_class_images"} <= tasks["training_runs"].upstream_task_ids
    assert tasks["training_runs"].trigger_rule == "none_failed"  # runs when prior preservation is skipped
    assert tasks["register"].upstream_task_ids == {"select"}
    assert tasks["select"].upstream_task_ids == {"evaluate"}
