"""plugins/dreamline: the same argv as a local subprocess and as a Kubernetes pod (rendered, no cluster)."""
from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowException
from PIL import Image

from dreamline import operators
from dreamline.operators import (LocalStepOperator, StepCrashed, StepRefused, parse_result, step_argv,
                                 step_operator_class)
from sd_tasks import cli
from sd_tasks.training import train

TRAIN_OPTIONS = {"cache": "s3://b/run/encoded", "output": "s3://b/run/train/lr-0.0001", "base_model": "m",
                 "learning_rate": 1e-4, "max_steps": 500, "gradient_checkpointing": True, "parent_run_id": None}


def test_step_argv_parses_back_to_the_same_config():
    argv = step_argv("train", TRAIN_OPTIONS)
    assert argv[:2] == ["train", "--cache=s3://b/run/encoded"] and not any("--parent-run-id" in a for a in argv)
    parser = cli.build_parser("train", train.TrainConfig)
    config = cli.make_config(train.TrainConfig, parser.parse_args(argv[1:]), parser)
    assert config == train.TrainConfig(**{k: v for k, v in TRAIN_OPTIONS.items() if v is not None})


def test_parse_result_takes_the_last_json_line():
    assert parse_result(["loading", '{"a": 1}', "warning: x", '{"b": 2}', "bye"]) == {"b": 2}
    assert parse_result(["no json", "{not json"]) is None


def test_local_operator_runs_the_step_and_returns_its_result(tmp_path, home):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (80, 80), (1, 2, 3)).save(images / "a.jpg")
    op = LocalStepOperator(task_id="validate", step="validate",
                           options={"input": str(images), "output": str(tmp_path / "out")})
    assert op.execute({"params": {}}) == {"report": f"{tmp_path / 'out'}/report.json", "accepted": 1, "rejected": 0}


def test_local_operator_fails_with_the_steps_one_line_error_and_no_retry_for_bad_input(tmp_path, home):
    op = LocalStepOperator(task_id="validate", step="validate",
                           options={"input": str(tmp_path / "missing"), "output": str(tmp_path / "out")})
    with pytest.raises(StepRefused, match=r"^error: validate: .*missing: no such directory$"):
        op.execute({"params": {}})


def test_local_operator_leaves_other_failures_to_retries(tmp_path, home):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (80, 80)).save(images / "a.png")
    op = LocalStepOperator(task_id="validate", step="validate",  # the output's parent is a file: an OSError
                           options={"input": str(images), "output": "/dev/null/out", "min_images": 1})
    with pytest.raises(StepCrashed, match=r"^error: validate: FileExistsError"):
        op.execute({"params": {}})


class FakeKubernetesApi:
    """The part of CoreV1Api that KubernetesPodOperator.cleanup calls: the cluster is the one thing not run here."""

    def __init__(self, pod):
        self.pod = pod

    def read_namespaced_pod(self, name, namespace, **kwargs):
        return self.pod

    def patch_namespaced_pod(self, name, namespace, body, **kwargs):
        return self.pod

    def delete_namespaced_pod(self, name, namespace, **kwargs):
        return None


def test_the_operators_know_the_steps_final_exit_codes():
    assert operators.FINAL_EXIT_CODES == cli.FINAL_EXIT_CODES  # the plugin cannot import sd_tasks in Airflow
    from sd_tasks.core import cost

    assert operators.COST_RECORD_ENV == cost.RECORD_ENV


@pytest.mark.parametrize(("exit_code", "final"), [(65, True), (2, True), (1, False), (137, False), (None, False)])
def test_a_failed_pod_is_final_only_when_the_step_refused(exit_code, final):
    from kubernetes.client import models as k8s

    op = step_operator_class("kubernetes")(task_id="train", step="train", options=TRAIN_OPTIONS, namespace="d")
    pod = op.build_pod_request_obj(dry_run=True)
    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code) if exit_code is not None else None
    base = k8s.V1ContainerStatus(name="base", image="i", image_id="", ready=False, restart_count=0,
                                 state=k8s.V1ContainerState(terminated=terminated))
    remote = k8s.V1Pod(metadata=pod.metadata, spec=pod.spec,
                       status=k8s.V1PodStatus(phase="Failed", container_statuses=[base]))
    op.__dict__["client"] = FakeKubernetesApi(remote)
    with pytest.raises(AirflowException, match="returned a failure") as failure:
        op.cleanup(pod, remote)
    assert type(failure.value) is (StepRefused if final else StepCrashed)  # STEP_RETRY_POLICY: fail / retry


def test_kubernetes_pod_gets_the_same_argv_gpu_and_result_file():
    KubernetesStepOperator = step_operator_class("kubernetes")
    op = KubernetesStepOperator(task_id="train", step="train", profile="gpu", options=TRAIN_OPTIONS,
                                namespace="dreamline", image="dreamline:test")
    pod = op.build_pod_request_obj(dry_run=True)
    container = pod.spec.containers[0]
    assert container.command == ["python", "-m", "sd_tasks"]
    assert container.args == step_argv("train", TRAIN_OPTIONS)
    assert container.image == "dreamline:test" and pod.metadata.namespace == "dreamline"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.node_selector == {"dreamline.io/pool": "gpu"}
    assert any(t.key == "nvidia.com/gpu" for t in pod.spec.tolerations)
    env = {e.name: e.value for e in container.env}
    assert env["SD_TASKS_RESULT_FILE"] == "/airflow/xcom/return.json" and "MLFLOW_TRACKING_URI" in env
    assert [c.name for c in pod.spec.containers] == ["base", "airflow-xcom-sidecar"]
    assert op.startup_timeout_seconds >= 600  # GPU node scale-up outlasts KPO's 120 s default
    assert container.termination_message_policy == "FallbackToLogsOnError"  # the `error:` line reaches the task


def test_cpu_profile_pod_has_no_gpu():
    op = step_operator_class("kubernetes")(task_id="validate", step="validate", options={"input": "a"},
                                           namespace="dreamline")
    pod = op.build_pod_request_obj(dry_run=True)
    assert "nvidia.com/gpu" not in pod.spec.containers[0].resources.limits and not pod.spec.tolerations


def test_result_file_is_written_for_the_xcom_sidecar(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.RESULT_FILE_ENV, str(tmp_path / "xcom" / "return.json"))
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (80, 80)).save(images / "a.png")
    assert cli.main(["validate", "--input", str(images), "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "xcom" / "return.json").read_text())["accepted"] == 1


def test_multi_gpu_profile_runs_the_step_under_accelerate_launch():
    op = step_operator_class("kubernetes")(task_id="train", step="train", profile="gpu-x4", options=TRAIN_OPTIONS,
                                           namespace="dreamline")
    container = op.build_pod_request_obj(dry_run=True).spec.containers[0]
    assert container.command == ["accelerate", "launch", "--multi_gpu", "--num_processes=4", "-m", "sd_tasks"]
    assert container.args == step_argv("train", TRAIN_OPTIONS)
    assert container.resources.limits["nvidia.com/gpu"] == "4"
