"""One stack's folder, ports and secrets, and the environments its services and the DAG's steps run with.

Everything lives under one folder:

    stack.json   ports, bucket and the secrets generated for this stack (mode 0600)
    stack.env    the variables a shell needs to use the stack (`set -a; . stack.env; set +a`), mode 0600
    pids/        one record per running service
    postgres/    PostgreSQL's data folder and log
    s3/          SeaweedFS's data, its identities file (0600) and log
    mlflow/      the MLflow server's log and temp folder
    airflow/     AIRFLOW_HOME: task logs, the admin password file (0600), component logs, and the airflow.cfg
                 Airflow writes with its defaults on first start (sqlite, its own random keys: unused, since the
                 AIRFLOW__* variables below take precedence over the file)
    models/      the offline tiny models
    registry/    repo/: the DVC data registry (a Git repo; its DVC remote is s3://<bucket>/dvc), and publish logs
    scratch/     TMPDIR, caches and DREAMLINE_HOME of the step processes (nothing of a run stays there)

Secrets are generated once, when the folder is created, and kept: restarting a stack keeps its logins. Ports are
chosen then too (well-known ones unless asked otherwise) and kept, since SeaweedFS names its metadata folder
after its master's port.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.local.seaweedfs import GRPC_OFFSET, free_port_pairs

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
# What a person expects to type into a browser; the test passes free ports instead.
DEFAULT_PORTS = {"airflow": 8080, "mlflow": 5000, "s3": 8333, "postgres": 5432}
SEAWEEDFS_INTERNAL = ("master", "volume", "filer", "admin")  # ports of weed mini's other components
# Variables of the caller's shell that would change where the stack's services or steps go; the stack sets its own.
FOREIGN_PREFIXES = ("AIRFLOW", "MLFLOW_", "DREAMLINE_", "AWS_", "HF_", "SD_TASKS_", "DVC_", "FSSPEC_", "PG",
                    "TMPDIR", "XDG_CACHE_HOME", "S3_BUCKET")
SAMPLE_SUBJECT = REPO / "sample_data" / "dog"


def _secret() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class Stack:
    folder: Path
    ports: dict[str, int]
    seaweedfs_ports: dict[str, int]
    bucket: str = "dreamline"
    schedules: bool = True  # False: the scheduler creates no scheduled runs (Airflow's use_job_schedule)
    # The subject registry the DAGs are made from (DREAMLINE_SUBJECTS): a YAML file or `variable:NAME`; None: the
    # repo's dags/subjects.yaml.
    subjects: str | None = None
    gpu_slots: int = 2  # slots of Airflow's `gpu` pool: how many GPU steps (encode, train, evaluate) run at once
    # DREAMLINE_BASE_MODEL, _CLIP_MODEL, _DINO_MODEL as `up` was given them (deploy/local/models.py); empty: the tiny
    # models under models/
    models: dict[str, str] = field(default_factory=dict)
    gpu_devices: str = ""  # with hub models: the GPUs the steps share out, one each (DREAMLINE_GPU_DEVICES)
    secrets: dict[str, str] = field(default_factory=lambda: {
        "postgres_password": _secret(), "airflow_db_password": _secret(), "mlflow_db_password": _secret(),
        "s3_access_key": "DL" + secrets.token_hex(9).upper(), "s3_secret_key": secrets.token_urlsafe(30),
        "airflow_admin_password": _secret(), "airflow_jwt_secret": secrets.token_urlsafe(48),
        "airflow_api_secret_key": secrets.token_urlsafe(32),
        "airflow_fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
    })

    # -- the folder -------------------------------------------------------------------------------------------
    @property
    def settings_file(self) -> Path:
        return self.folder / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.folder / "stack.env"

    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    @property
    def registry(self) -> Path:
        return self.path("registry", "repo")

    @classmethod
    def load(cls, folder: Path) -> Stack | None:
        file = folder / "stack.json"
        if not file.exists():
            return None
        try:
            data = json.loads(file.read_text())
            return cls(folder=folder, **{k: v for k, v in data.items() if k != "folder"})
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{file}: not a stack settings file ({exc})") from None

    @classmethod
    def create(cls, folder: Path, ports: dict[str, int | None], schedules: bool, subjects: str | None = None,
               gpu_slots: int = 2) -> Stack:
        chosen = {name: ports.get(name) or default for name, default in DEFAULT_PORTS.items()}
        if len(set(chosen.values())) < len(chosen):
            raise ValueError(f"two services were given the same port: {chosen}")
        taken = tuple(chosen.values()) + (chosen["s3"] + GRPC_OFFSET,)
        internal = dict(zip(SEAWEEDFS_INTERNAL, free_port_pairs(len(SEAWEEDFS_INTERNAL), taken=taken)))
        return cls(folder=folder, ports=chosen, seaweedfs_ports=internal, schedules=schedules, subjects=subjects,
                   gpu_slots=gpu_slots)

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "folder"}
        write_private(self.settings_file, json.dumps(data, indent=2) + "\n")
        exports = "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(self.client_env().items()))
        write_private(self.env_file, "# The environment to use this stack from a shell: set -a; . stack.env; set +a\n"
                       + exports)

    # -- addresses --------------------------------------------------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def airflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['airflow']}"

    def database_url(self, name: str, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy URL of the `airflow` or `mlflow` database, as its own user."""
        return f"{driver}://{name}:{self.secrets[f'{name}_db_password']}@{HOST}:{self.ports['postgres']}/{name}"

    # -- environments -----------------------------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        """The caller's environment without what would redirect the stack, plus the venv's bin on PATH (Airflow
        and the steps run `python -m ...` with this interpreter; git comes from PATH)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        return env

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.secrets["s3_access_key"],
                "AWS_SECRET_ACCESS_KEY": self.secrets["s3_secret_key"],
                "AWS_ENDPOINT_URL_S3": self.s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def scratch_env(self) -> dict[str, str]:
        """Scratch space of step processes: temp files, caches and DREAMLINE_HOME inside the stack folder."""
        scratch = self.path("scratch")
        for name in ("tmp", "home", "cache"):
            (scratch / name).mkdir(parents=True, exist_ok=True)
        cache = scratch / "cache"
        return {"TMPDIR": str(scratch / "tmp"), "DREAMLINE_HOME": str(scratch / "home"),
                "SD_TASKS_CACHE": str(cache / "sd_tasks"), "DVC_SITE_CACHE_DIR": str(cache / "dvc"),
                "XDG_CACHE_HOME": str(cache), "HF_HOME": str(cache / "huggingface"),
                "MPLCONFIGDIR": str(cache / "matplotlib"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor")}

    def model_settings(self) -> dict[str, str]:
        from deploy.local.models import tiny_models

        return self.models or tiny_models(self.path("models"))

    def deployment_env(self) -> dict[str, str]:
        """What the DAG is configured by (plugins/dreamline/deployment.py) and its step processes see: with hub
        models, also the caller's HF_ENDPOINT and HF_TOKEN, and its HF_HOME (a model cache it already has)."""
        from deploy.local.models import environment

        hub = {k: os.environ[k] for k in ("HF_ENDPOINT", "HF_TOKEN", "HF_HOME") if self.models and os.environ.get(k)}
        return {
            "DREAMLINE_EXECUTOR": "local",
            "DREAMLINE_STORAGE": f"s3://{self.bucket}/runs",
            "DREAMLINE_CACHE": f"s3://{self.bucket}/cache",
            "DREAMLINE_DATASET_REPO": str(self.registry),
            **environment(self.model_settings()),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "DVC_NO_ANALYTICS": "1",
            **({"DREAMLINE_SUBJECTS": self.subjects} if self.subjects else {}),
            **self.s3_env(),
            **self.scratch_env(),
            **hub,
            "DREAMLINE_GPU_SLOTS": str(self.gpu_slots),  # the pool's size: evaluations are shared out over as many
            **({"DREAMLINE_GPU_DEVICES": self.gpu_devices} if self.gpu_devices else {}),
        }

    def airflow_process_env(self) -> dict[str, str]:
        """The environment of Airflow's components and of `airflow` commands run for the stack."""
        return {**self.base_env(), **self.deployment_env(), **self.airflow_env()}

    def airflow_env(self) -> dict[str, str]:
        """Airflow's configuration, the same for its four components (and the `airflow` CLI)."""
        home = self.path("airflow")
        return {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__FERNET_KEY": self.secrets["airflow_fernet_key"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url("airflow"),
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(self.ports["airflow"]),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": self.secrets["airflow_api_secret_key"],
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secrets["airflow_jwt_secret"],
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(self.schedules),
        }

    def client_env(self) -> dict[str, str]:
        """What a shell needs to publish data, query MLflow, use S3 and run `airflow` commands: the deployment
        without the steps' scratch folders, and Airflow's configuration; DREAMLINE_STACK names the stack for
        `python -m deploy.local.stack`."""
        scratch = self.scratch_env()
        deployment = {k: v for k, v in self.deployment_env().items() if k not in scratch and k != "HF_TOKEN"}
        return {**deployment, **self.airflow_env(), "DREAMLINE_STACK": str(self.folder)}


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, never readable by others even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
