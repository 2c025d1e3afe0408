"""Run an `sd_tasks` step from Airflow: as a local subprocess or as a Kubernetes pod, with the same argv.

A task says which step and with which options (a dict, templated, mappable with `.expand(options=...)`); both
operators turn that into `python -m sd_tasks <step> --flag value ...` via `step_argv` and push the step's one-line
JSON result to XCom. `StepOperator` is the one the deployment selects (DREAMLINE_EXECUTOR).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dreamline.deployment import DEPLOYMENT, REPO_ROOT
from dreamline.profiles import PROFILES

# sd_tasks.cli.FINAL_EXIT_CODES (a test keeps them equal): Airflow's components do not have sd_tasks on their path.
FINAL_EXIT_CODES = frozenset({65, 2})


def step_argv(step: str, options: dict[str, Any]) -> list[str]:
    """`sd_tasks` arguments for a step: {"max_steps": 20, "prompts": ["a", "b"], "debug": False} becomes
    [step, "--max-steps", "20", "--prompts", "a", "b", "--no-debug"]. None values are left out."""
    argv = [step]
    for name, value in options.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_result(lines: list[str]) -> dict | None:
    """The step's result: the last line of its output that is a JSON object."""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def step_failure(exit_code: int | None, message: str) -> AirflowException:
    """The step refused its input or its run cannot succeed as asked (bad images, a diverging learning rate): fail
    at once, since a retry would only repeat it. Anything else (a crash, a kill, a preempted pod) may be retried."""
    return AirflowFailException(message) if exit_code in FINAL_EXIT_CODES else AirflowException(message)


class LocalStepOperator(BaseOperator):
    """Run a step as a subprocess of the worker, in the same Python environment."""

    template_fields = ("options",)
    ui_color = "#e8f1fb"

    def __init__(self, *, step: str, options: dict[str, Any], profile: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.step, self.options, self.profile = step, options, PROFILES[profile]

    def execute(self, context) -> dict:
        argv = [sys.executable, "-m", "sd_tasks", *step_argv(self.step, self.options)]
        self.log.info("Running %s", " ".join(argv[1:]))
        env = {**os.environ, **DEPLOYMENT.step_env,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=env, cwd=REPO_ROOT)
        lines = []
        for line in self._process.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            self.log.info("%s", line)
        if self._process.wait() != 0:
            errors = [line for line in lines if line.startswith("error: ")]
            raise step_failure(self._process.returncode,
                               errors[-1] if errors else f"step {self.step} exited {self._process.returncode}")
        result = parse_result(lines)
        if result is None:
            raise AirflowException(f"step {self.step} printed no JSON result")
        return result

    def on_kill(self) -> None:
        process = getattr(self, "_process", None)
        if process and process.poll() is None:
            process.terminate()  # the step turns SIGTERM into a clean exit: MLflow runs end FAILED
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _kubernetes_operator():
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    class KubernetesStepOperator(KubernetesPodOperator):
        """Run a step as a pod of the Dreamline image; the argv is the local operator's, without the interpreter
        path. The step writes its result to /airflow/xcom/return.json, which the XCom sidecar reads."""

        template_fields = (*KubernetesPodOperator.template_fields, "options")

        def __init__(self, *, step: str, options: dict[str, Any], profile: str = "cpu", **kwargs):
            p = PROFILES[profile]
            limits = {"cpu": p.cpu, "memory": p.memory} | ({"nvidia.com/gpu": str(p.gpus)} if p.gpus else {})
            kwargs.setdefault("name", f"sd-{step}")
            kwargs.setdefault("namespace", DEPLOYMENT.namespace)
            kwargs.setdefault("image", DEPLOYMENT.image)
            # Several GPUs: the same step under `accelerate launch`, one process per GPU.
            launcher = (["accelerate", "launch", "--multi_gpu", f"--num_processes={p.gpus}"] if p.gpus > 1
                        else ["python"])
            super().__init__(
                cmds=[*launcher, "-m", "sd_tasks"],
                arguments=[],  # filled from the rendered options in build_pod_request_obj
                env_vars={**DEPLOYMENT.step_env, "SD_TASKS_RESULT_FILE": "/airflow/xcom/return.json"},
                container_resources=k8s.V1ResourceRequirements(requests={"cpu": p.cpu, "memory": p.memory},
                                                               limits=limits),
                node_selector=p.node_selector or None,
                tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
                if p.gpus else None,
                startup_timeout_seconds=p.startup_timeout_seconds,
                termination_message_policy="FallbackToLogsOnError",  # the step's `error:` line in the failure
                do_xcom_push=True,
                on_finish_action="delete_succeeded_pod",
                **kwargs,
            )
            self.step, self.options = step, options

        def build_pod_request_obj(self, context=None, **kwargs):
            self.arguments = step_argv(self.step, self.options)
            return super().build_pod_request_obj(context, **kwargs)

        def cleanup(self, pod, remote_pod, *args, **kwargs):
            try:
                super().cleanup(pod, remote_pod, *args, **kwargs)
            except AirflowException as failure:
                if type(failure) is not AirflowException:  # a skip or an already final failure
                    raise
                raise step_failure(base_container_exit_code(remote_pod, self.base_container_name),
                                   str(failure)) from failure

    return KubernetesStepOperator


def base_container_exit_code(pod, container: str) -> int | None:
    statuses = (pod.status.container_statuses if pod and pod.status else None) or []
    base = next((s for s in statuses if s.name == container), None)
    terminated = base and base.state and base.state.terminated
    return terminated.exit_code if terminated else None


def step_operator_class(executor: str = DEPLOYMENT.executor) -> type[BaseOperator]:
    if executor == "local":
        return LocalStepOperator
    if executor == "kubernetes":
        return _kubernetes_operator()
    raise ValueError(f"DREAMLINE_EXECUTOR={executor!r}: use local or kubernetes")


StepOperator = step_operator_class()
