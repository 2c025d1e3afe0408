"""Run an `sd_tasks` step from Airflow: as a local subprocess or as a Kubernetes pod, with the same argv.

A task says which step and with which options (a dict, templated, mappable with `.expand(options=...)`); both
operators turn that into `python -m sd_tasks <step> --flag=value ...` via `step_argv` and push the step's one-line
JSON result to XCom. `StepOperator` is the one the deployment selects (DREAMLINE_EXECUTOR).

Values keep their types: a form value is given as `param("name")`, which Airflow's templater resolves to the run's
validated value when the task runs, not rendered through Jinja (native rendering would make the dataset version
"1.10" the number 1.1, and plain rendering every number a string); Jinja templates are only for strings built
from the run (its folder, an earlier task's result). And a value can never become a
flag: every option is passed as `--flag=value`, so a prompt that starts with `--` is still a prompt.

A step that refuses its input (exit 65 or 2) raises `StepRefused` and fails at once; anything else (a crash, a
kill, a preempted pod) raises `StepCrashed` and is retried with backoff (`STEP_RETRY_POLICY`).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any

from dataclasses import dataclass
from datetime import timedelta

from airflow.sdk import BaseOperator, ExceptionRetryPolicy, RetryAction, RetryRule
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dreamline import gpus
from dreamline.deployment import DEPLOYMENT, MODEL_CACHE_MOUNT, REPO_ROOT
from dreamline.profiles import PROFILES, step_resources
from dreamline.redact import redact, secrets_in

# sd_tasks.cli.FINAL_EXIT_CODES (a test keeps them equal): Airflow's components do not have sd_tasks on their path.
FINAL_EXIT_CODES = frozenset({65, 2})
COST_RECORD_ENV = "DREAMLINE_COST_RECORD"  # sd_tasks.core.cost.RECORD_ENV


@dataclass(frozen=True)
class param:  # noqa: N801 (reads as a function in the DAG's options)
    """An option whose value is the run's form value `name`, typed as the form validated it. Airflow's templater
    calls `resolve` on any value that has one."""

    name: str

    def resolve(self, context) -> Any:
        return context["params"][self.name]

    def __repr__(self) -> str:  # what the UI shows before the task runs
        return f"params.{self.name}"


@dataclass(frozen=True)
class evaluation_folders:  # noqa: N801
    """An option whose value is every folder the `evaluate` tasks whose options `task_id` returned write: the
    output of each of their targets (dreamline.plan.evaluation_folders)."""

    task_id: str

    def resolve(self, context) -> list[str]:
        from dreamline.plan import evaluation_folders as folders

        return folders(context["ti"].xcom_pull(task_ids=self.task_id) or [])

    def __repr__(self) -> str:
        return f"{self.task_id}[*].targets"


@dataclass(frozen=True)
class pinned:  # noqa: N801
    """An option whose value is the form's model setting `name` as the `models` task pinned it (`id@sha`), or the
    form's value where that task did not pin it (the captioning model when captions do not come from a model)."""

    name: str

    def resolve(self, context) -> str | None:
        return (context["ti"].xcom_pull(task_ids="models") or {}).get(self.name) or context["params"][self.name] \
            or None

    def __repr__(self) -> str:
        return f"models.{self.name}"


def step_argv(step: str, options: dict[str, Any]) -> list[str]:
    """`sd_tasks` arguments for a step: {"max_steps": 20, "prompts": ["a", "b"], "debug": False} becomes
    [step, "--max-steps=20", "--prompts=a", "--prompts=b", "--no-debug"]. None values are left out. The `=` form
    keeps every value a value, even one that starts with `--`."""
    argv = [step]
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, (param, evaluation_folders, pinned)):
            raise TypeError(f"{step}: option {name} is {value!r}, not rendered yet")
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [f"{flag}={item}" for item in value]
        else:
            argv.append(f"{flag}={value}")
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


class StepRefused(AirflowException):
    """The step refused its input, or its run cannot succeed as asked (bad images, a diverging learning rate)."""


class StepCrashed(AirflowException):
    """The step crashed, was killed or lost its pod: running it again may succeed (every step is safe to rerun)."""


def step_failure(exit_code: int | None, message: str) -> AirflowException:
    return StepRefused(message) if exit_code in FINAL_EXIT_CODES else StepCrashed(message)


# Retries that fit the error: refused input fails at once, since a retry would only repeat it; a crash or a lost
# pod is retried (train resumes from its latest checkpoint and continues its own MLflow run). Other errors, such as
# a pod that never started, take the task's own retries.
STEP_RETRY_POLICY = ExceptionRetryPolicy(rules=[
    RetryRule(exception=StepRefused, action=RetryAction.FAIL, reason="the step refused its input"),
    RetryRule(exception=StepCrashed, action=RetryAction.RETRY, reason="the step crashed or was stopped"),
])
STEP_RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=DEPLOYMENT.retry_delay),  # DREAMLINE_RETRY_DELAY, 60
                "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=15),
                "retry_policy": STEP_RETRY_POLICY}


class LocalStepOperator(BaseOperator):
    """Run a step as a subprocess of the worker, in the same Python environment, in a scratch working folder
    (`$DREAMLINE_HOME/steps`: nothing a step does lands in the checkout, and no folder there can stand in for a hub
    model). A GPU step on a machine with several GPUs (DREAMLINE_GPU_DEVICES) gets one of its own (dreamline.gpus)."""

    template_fields = ("options",)
    ui_color = "#e8f1fb"

    def __init__(self, *, step: str, options: dict[str, Any], profile: str = "cpu", **kwargs):
        super().__init__(**{**step_resources(step, profile), **STEP_RETRIES, **kwargs})
        self.step, self.options, self.profile = step, options, PROFILES[profile]

    def execute(self, context) -> dict:
        argv = [sys.executable, "-m", "sd_tasks", *step_argv(self.step, self.options)]
        self.log.info("Running %s", shown_argv(argv[1:]))
        record = cost_record(context)
        env = {**os.environ, **DEPLOYMENT.step_env, **({COST_RECORD_ENV: record} if record else {}),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        scratch = DEPLOYMENT.home / "steps"
        scratch.mkdir(parents=True, exist_ok=True)
        with self.gpus() as (devices, locks):
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
                self.log.info("On GPU %s", env["CUDA_VISIBLE_DEVICES"])
            self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                             env=env, cwd=scratch, pass_fds=locks)  # the step holds its GPU's lock
        lines = []
        for line in self._process.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            self.log.info("%s", redact(line))
        if self._process.wait() != 0:
            errors = [line for line in lines if line.startswith("error: ")]
            raise step_failure(self._process.returncode,
                               redact(errors[-1]) if errors else f"step {self.step} exited {self._process.returncode}")
        result = parse_result(lines)
        if result is None:
            raise AirflowException(f"step {self.step} printed no JSON result")
        return result

    def gpus(self):
        """The GPUs this step leases, with their locks; none for a CPU step or without DREAMLINE_GPU_DEVICES."""
        if not (self.profile.gpus and DEPLOYMENT.gpu_devices):
            return contextlib.nullcontext(([], []))
        return gpus.lease(DEPLOYMENT.gpu_devices, self.profile.gpus, DEPLOYMENT.home / "gpus", log=self.log.info)

    def on_kill(self) -> None:
        process = getattr(self, "_process", None)
        if process and process.poll() is None:
            process.terminate()  # the step turns SIGTERM into a clean exit: MLflow runs end FAILED
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


# Steps that load a model: they get the model-cache volume as their Hugging Face cache.
MODEL_STEPS = frozenset({"pin-models", "caption", "encode", "class-images", "train", "evaluate"})
WORKER_UID = 50000  # the worker image's user (Dockerfile)


def _kubernetes_operator():
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    class KubernetesStepOperator(KubernetesPodOperator):
        """Run a step as a pod of the worker image; the argv is the local operator's, without the interpreter
        path. The step writes its result to /airflow/xcom/return.json, which the XCom sidecar reads.

        What a pod gets besides its argv (docs/deployment.md): its settings and credentials from the deployment's
        ConfigMap and Secrets (never a literal credential), the model-cache volume as its Hugging Face cache when
        the step loads a model, a memory-backed /dev/shm on GPU nodes (the data loader's and NCCL's shared memory),
        a scratch /tmp under a read-only root filesystem, a restricted security context, and labels naming its
        DAG, task, run and map index. A retried task reattaches to its pod when it is still running (`durable`);
        a failed pod is kept for `kubectl logs/describe`, a succeeded one deleted."""

        template_fields = (*KubernetesPodOperator.template_fields, "options")

        def __init__(self, *, step: str, options: dict[str, Any], profile: str = "cpu", **kwargs):
            kwargs = {**step_resources(step, profile), **STEP_RETRIES, **kwargs}
            p = PROFILES[profile]
            d = DEPLOYMENT
            requests = {"cpu": p.cpu, "memory": p.memory, "ephemeral-storage": p.scratch}
            limits = requests | ({"nvidia.com/gpu": str(p.gpus)} if p.gpus else {})
            volumes, mounts = pod_volumes(step, p, k8s)
            restricted = k8s.V1SecurityContext(allow_privilege_escalation=False, privileged=False,
                                               read_only_root_filesystem=True, run_as_non_root=True,
                                               capabilities=k8s.V1Capabilities(drop=["ALL"]))
            kwargs.setdefault("name", f"sd-{step}")
            kwargs.setdefault("namespace", d.namespace)
            kwargs.setdefault("image", d.image)
            # Several GPUs: the same step under `accelerate launch`, one process per GPU.
            launcher = (["accelerate", "launch", "--multi_gpu", f"--num_processes={p.gpus}"] if p.gpus > 1
                        else ["python"])
            super().__init__(
                cmds=[*launcher, "-m", "sd_tasks"],
                arguments=[],  # filled from the rendered options in build_pod_request_obj
                env_vars=pod_environment(step),
                env_from=[k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=d.configmap))]
                + ([k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=d.s3_secret))] if d.s3_secret else [])
                + [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=n, optional=True))
                   for n in d.optional_secrets],
                container_resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
                volumes=volumes,
                volume_mounts=mounts,
                node_selector=p.node_selector or None,
                tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
                if p.gpus else None,
                service_account_name=d.service_account,
                automount_service_account_token=False,  # steps never call the Kubernetes API
                image_pull_policy=d.image_pull_policy,
                image_pull_secrets=[k8s.V1LocalObjectReference(name=n) for n in d.image_pull_secrets] or None,
                security_context=k8s.V1PodSecurityContext(
                    run_as_non_root=True, run_as_user=WORKER_UID, run_as_group=0, fs_group=0,
                    seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
                container_security_context=restricted,
                xcom_sidecar_container_security_context=restricted,
                labels={"app.kubernetes.io/name": "dreamline", "app.kubernetes.io/component": step},
                startup_timeout_seconds=p.startup_timeout_seconds,
                termination_message_policy="FallbackToLogsOnError",  # the step's `error:` line in the failure
                do_xcom_push=True,
                durable=True,  # a retried task (the worker died) reattaches to the running pod
                on_finish_action="delete_succeeded_pod",  # a failed pod stays for debugging
                **kwargs,
            )
            self.step, self.options, self.profile_name = step, options, profile

        def execute(self, context):
            local = local_paths(self.options)
            if local:
                name, value = local[0]
                raise AirflowFailException(
                    f"{self.step}: --{name.replace('_', '-')} {value} is a path on this machine; in kubernetes mode "
                    f"step inputs and outputs must be remote URIs (a pod's disk is gone when it ends)")
            shown_argv(step_argv(self.step, self.options))  # masks credentials in the pod's logs and spec as shown
            return super().execute(context)

        def build_pod_request_obj(self, context=None, **kwargs):
            self.arguments = step_argv(self.step, self.options)
            pod = super().build_pod_request_obj(context, **kwargs)
            if context is not None and (record := cost_record(context)):  # per try, unlike the rest of the pod
                pod.spec.containers[0].env.append(k8s.V1EnvVar(name=COST_RECORD_ENV, value=record))
            return pod

        def cleanup(self, pod, remote_pod, *args, **kwargs):
            try:
                super().cleanup(pod, remote_pod, *args, **kwargs)
            except AirflowException as failure:
                if type(failure) is not AirflowException:  # a skip or an already final failure
                    raise
                raise step_failure(base_container_exit_code(remote_pod, self.base_container_name),
                                   str(failure)) from failure

    return KubernetesStepOperator


def shown_argv(argv: list[str]) -> str:
    """The argv as a log may show it: credentials in URLs as ***; and each registered with Airflow's secrets masker,
    so the step's own output and Airflow's task log hide it too."""
    from airflow.sdk.log import mask_secret

    text = " ".join(argv)
    for secret in secrets_in(text):
        mask_secret(secret)
    return redact(text)


def cost_record(context) -> str | None:
    """Where this try of this task writes its seconds and GPUs (sd_tasks.core.cost): one file per try, so a retry adds
    its own and nothing is counted twice. None outside a DAG run."""
    ti = context.get("ti")
    if ti is None or "run_id" not in context:
        return None
    index = f".{ti.map_index}" if ti.map_index is not None and ti.map_index >= 0 else ""
    run = DEPLOYMENT.run_dir(ti.dag_id, context["run_id"])
    return f"{run}/cost/{ti.task_id}{index}.try-{ti.try_number}.json"


def uses_model_cache(step: str) -> bool:
    return bool(DEPLOYMENT.model_cache_pvc) and step in MODEL_STEPS


def pod_environment(step: str) -> dict[str, str]:
    """A pod's literal environment: where things are inside the pod, never a credential (those come from the
    deployment's Secrets, the endpoints from its ConfigMap). The tracking URI is the one Deployment.check
    accepted."""
    cache = uses_model_cache(step)
    return {"DREAMLINE_EXECUTOR": "kubernetes", "DREAMLINE_HOME": "/tmp/dreamline",
            "MLFLOW_TRACKING_URI": DEPLOYMENT.tracking_uri,
            "HOME": "/tmp", "TMPDIR": "/tmp", "SD_TASKS_CACHE": "/tmp/sd_tasks-cache",
            "HF_HOME": f"{MODEL_CACHE_MOUNT}/huggingface" if cache else "/tmp/huggingface",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
            "SD_TASKS_RESULT_FILE": "/airflow/xcom/return.json"}


def pod_volumes(step: str, profile, k8s) -> tuple[list, list]:
    """Scratch /tmp (the root filesystem is read-only), /dev/shm in memory on GPU pods (Docker's 64 MiB default
    starves data loaders and NCCL), and the model cache for steps that load a model."""
    volumes = [k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=profile.scratch))]
    mounts = [k8s.V1VolumeMount(name="scratch", mount_path="/tmp")]
    if profile.shm:
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                                     size_limit=profile.shm)))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    if uses_model_cache(step):
        volumes.append(k8s.V1Volume(name="model-cache", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=DEPLOYMENT.model_cache_pvc)))
        mounts.append(k8s.V1VolumeMount(name="model-cache", mount_path=MODEL_CACHE_MOUNT))
    return volumes, mounts


# Options whose values are text, never paths: "/imagine a photo of sks dog" and "~dreamy~ photo" are prompts.
TEXT_OPTIONS = frozenset({"template", "reason", "by", "identifier", "model_name", "tag", "rev", "path"})


def is_text_option(name: str) -> bool:
    return name in TEXT_OPTIONS or name.endswith(("prompt", "prompts"))


def local_paths(options: dict[str, Any]) -> list[tuple[str, str]]:
    """Options whose value is a path on this machine (models under the model-cache mount are the pod's own); text
    options (prompts, reasons) are text whatever they start with."""
    found = []
    for name, value in options.items():
        if is_text_option(name):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item.startswith(("/", "./", "~", "file:")) \
                    and not item.startswith(MODEL_CACHE_MOUNT + "/"):
                found.append((name, item))
    return found


def base_container_exit_code(pod, container: str) -> int | None:
    statuses = (pod.status.container_statuses if pod and pod.status else None) or []
    base = next((s for s in statuses if s.name == container), None)
    terminated = base and base.state and base.state.terminated
    return terminated.exit_code if terminated else None


def partial_step(*, task_id: str, step: str, profile: str = "cpu", **kwargs):
    """`StepOperator.partial(...)` for a mapped step, with its profile's pool and time limit where the scheduler
    reads them (a plain StepOperator sets them itself)."""
    return StepOperator.partial(task_id=task_id, step=step, profile=profile,
                                **{**step_resources(step, profile), **STEP_RETRIES, **kwargs})


def step_operator_class(executor: str = DEPLOYMENT.executor) -> type[BaseOperator]:
    if executor == "local":
        return LocalStepOperator
    return _kubernetes_operator()


DEPLOYMENT.check()  # in kubernetes mode, a setting no pod could use fails DAG parsing, naming it
StepOperator = step_operator_class()
