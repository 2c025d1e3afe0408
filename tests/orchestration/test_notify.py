"""The webhook notifier through Airflow (`airflow dags test`) against a local HTTP receiver: a failed mapped task
is posted with its error line and log link, a promotion only when asked for, nothing without the connection, and a
webhook that answers 500 or is down changes no task state."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
from conftest import REPO

TOKEN = "s3cr3t-webhook-token-42"
ERROR = "error: train: training diverged at step 3 (loss nan)"
PROMOTION = {"model_name": "dog-sdxl-lora", "version": 3, "promoted": True, "reason": "first version",
             "aliases": ["challenger", "champion"]}
PROBE_DAG = f'''
from airflow.sdk import dag, get_current_context, task
from dreamline.notify import on_failure, on_promotion


@dag(dag_id="notify_probe", schedule=None, default_args={{"on_failure_callback": on_failure}})
def notify_probe():
    @task(map_index_template="{{{{ label }}}}")
    def train(lr: float):
        get_current_context()["label"] = f"lr={{lr}}"
        if lr > 1:
            raise RuntimeError({ERROR!r} + "\\nTraceback: more lines the payload leaves out")
        return lr

    @task(on_success_callback=on_promotion)
    def register():
        return {PROMOTION!r}

    @task(on_success_callback=on_promotion)
    def register_not_promoted():
        return {{**{PROMOTION!r}, "promoted": False, "version": 4}}

    train.expand(lr=[0.0001, 1000000.0])
    register()
    register_not_promoted()


notify_probe()
'''
EXPECTED_STATES = {("train", 0): "success", ("train", 1): "failed", ("register", -1): "success",
                   ("register_not_promoted", -1): "success"}


class Receiver:
    """A webhook on 127.0.0.1: records every POST (path, headers, JSON body) and answers `status`."""

    def __init__(self, status: int = 200):
        self.status, self.requests = status, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": json.loads(body)})
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """run(connection) runs the probe DAG once with AIRFLOW_CONN_DREAMLINE_WEBHOOK set to `connection` (or unset)
    and returns its output, its run_id and its task states."""
    home = tmp_path_factory.mktemp("notify-home")
    dags = home / "dags"
    dags.mkdir()
    (dags / "notify_probe.py").write_text(PROBE_DAG)
    env = {**os.environ, "AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__API__BASE_URL": "http://airflow.example:8080/"}
    env.pop("AIRFLOW_CONN_DREAMLINE_WEBHOOK", None)
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True, cwd=REPO)

    def run(connection: str | None) -> dict:
        run_env = {**env, "AIRFLOW_CONN_DREAMLINE_WEBHOOK": connection} if connection else env
        proc = subprocess.run([*airflow, "dags", "test", "notify_probe"], env=run_env, capture_output=True,
                              text=True, cwd=REPO, timeout=300, check=False)
        with sqlite3.connect(home / "airflow" / "airflow.db") as db:
            (run_id, dag_state), = db.execute(
                "SELECT run_id, state FROM dag_run WHERE dag_id = 'notify_probe' ORDER BY id DESC LIMIT 1").fetchall()
            states = {(t, m): s for t, m, s in db.execute(
                "SELECT task_id, map_index, state FROM task_instance WHERE run_id = ?", (run_id,))}
        logs = "".join(p.read_text(errors="replace") for p in (home / "airflow" / "logs").rglob("*") if p.is_file())
        return {"proc": proc, "output": proc.stdout + proc.stderr + logs, "run_id": run_id, "dag_state": dag_state,
                "states": states}

    return run


def conn_json(port: int, **extra) -> str:
    return json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": port, "schema": "hooks/dreamline",
                       "password": TOKEN, "extra": extra})


@pytest.fixture(scope="module")
def notified(airflow):
    """A run with a webhook that accepts, a bearer token and promotion notices on."""
    receiver = Receiver()
    try:
        yield {**airflow(conn_json(receiver.port, notify_promotions=True)), "requests": receiver.requests}
    finally:
        receiver.close()


def test_failure_is_posted_with_error_line_and_log_link(notified):
    assert notified["states"] == EXPECTED_STATES and notified["dag_state"] == "failed", notified["output"][-3000:]
    failures = [r for r in notified["requests"] if r["body"]["event"] == "failure"]
    assert len(failures) == 1, notified["requests"]
    request, body = failures[0], failures[0]["body"]
    assert request["path"] == "/hooks/dreamline"
    assert request["headers"]["Content-Type"] == "application/json"
    assert {k: body[k] for k in ("dag_id", "task_id", "map_index", "run_id", "try_number", "error")} == {
        "dag_id": "notify_probe", "task_id": "train", "map_index": 1, "run_id": notified["run_id"],
        "try_number": 1, "error": ERROR}
    assert body["log_url"] == (f"http://airflow.example:8080/dags/notify_probe/runs/{quote(notified['run_id'])}"
                               "/tasks/train/mapped/1?try_number=1")
    assert body["text"] == f"notify_probe task train [lr=1000000.0] failed: {ERROR} {body['log_url']}"


def test_promotion_is_posted_only_for_a_promoted_version(notified):
    promotions = [r["body"] for r in notified["requests"] if r["body"]["event"] == "promotion"]
    assert len(promotions) == 1, notified["requests"]  # register_not_promoted sent nothing
    body = promotions[0]
    assert {k: body[k] for k in ("dag_id", "task_id", "map_index", "model_name", "version", "reason", "aliases")} == {
        "dag_id": "notify_probe", "task_id": "register", "map_index": None, "model_name": "dog-sdxl-lora",
        "version": 3, "reason": "first version", "aliases": ["challenger", "champion"]}
    assert f"/dags/notify_probe/runs/{quote(notified['run_id'])}/tasks/register" in body["log_url"]
    assert "dog-sdxl-lora version 3 promoted" in body["text"]


def test_token_goes_in_the_header_only(notified):
    assert notified["requests"]
    for request in notified["requests"]:
        assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in json.dumps(request["body"])
    assert "notification sent to connection dreamline_webhook" in notified["output"]
    assert TOKEN not in notified["output"]


def test_nothing_is_sent_without_the_connection(airflow):
    receiver = Receiver()  # listening, but nobody is told about it
    try:
        result = airflow(None)
    finally:
        receiver.close()
    assert receiver.requests == []
    assert result["states"] == EXPECTED_STATES and result["dag_state"] == "failed", result["output"][-3000:]
    assert "No connection dreamline_webhook: no failure notification sent" in result["output"]


def test_a_webhook_answering_500_changes_no_task_state(airflow):
    receiver = Receiver(status=500)
    try:
        result = airflow(conn_json(receiver.port))  # no notify_promotions: the failure alone is posted
    finally:
        receiver.close()
    assert [r["body"]["event"] for r in receiver.requests] == ["failure"]
    assert result["states"] == EXPECTED_STATES and result["dag_state"] == "failed", result["output"][-3000:]
    assert "failure notification to connection dreamline_webhook not delivered: HTTP 500" in result["output"]
    assert TOKEN not in result["output"]


def test_a_webhook_that_is_down_logs_a_warning_and_does_not_raise(monkeypatch, capsys):
    """The notifier itself, outside Airflow's runtime: a closed port is one warning line, no exception."""
    from types import SimpleNamespace

    from airflow.sdk import Connection
    from dreamline import notify

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = Connection.from_uri(f"http://:{TOKEN}@127.0.0.1:{port}/hook", conn_id="dreamline_webhook")
    monkeypatch.setattr(notify.Connection, "get", classmethod(lambda cls, conn_id: conn))
    ti = SimpleNamespace(dag_id="d", task_id="t", map_index=-1, run_id="r", try_number=1, log_url="http://x/log")
    notify.on_failure({"ti": ti, "exception": RuntimeError(ERROR)})  # Airflow's structlog writes to stdout
    output = capsys.readouterr()
    warnings = [line for line in output.out.splitlines() if "warning" in line]
    assert len(warnings) == 1, output
    assert "failure notification to connection dreamline_webhook not delivered: unreachable (Connection refused)" \
        in warnings[0]
    assert TOKEN not in output.out + output.err


def test_connection_urls():
    from airflow.sdk import Connection
    from dreamline.notify import error_line, webhook_url

    assert webhook_url(Connection.from_uri("https://hooks.example.com/services/T0/B1", conn_id="c")) == \
        "https://hooks.example.com/services/T0/B1"
    assert webhook_url(Connection(conn_id="c", conn_type="http", host="127.0.0.1", port=8000, schema="h")) == \
        "http://127.0.0.1:8000/h"
    assert webhook_url(Connection(conn_id="c", conn_type="generic", host="https://hooks.example.com/x")) == \
        "https://hooks.example.com/x"
    assert error_line(RuntimeError("x" * 600 + "\nmore")) == "x" * 499 + "…"
    assert error_line(RuntimeError()) == "RuntimeError"
