"""Webhook notifications: a failed task (and, optionally, a promoted model) is posted as JSON to a webhook.

Configure the webhook as the Airflow connection `dreamline_webhook`; without it nothing is sent. For example
    AIRFLOW_CONN_DREAMLINE_WEBHOOK='https://hooks.example.com/services/abc'
or, with a bearer token (sent as `Authorization: Bearer <password>`, never logged) and promotion notices:
    AIRFLOW_CONN_DREAMLINE_WEBHOOK='{"conn_type": "https", "host": "hooks.example.com", "schema": "services/abc",
                                     "password": "<token>", "extra": {"notify_promotions": true}}'
The URL is <conn_type http|https>://<host>[:<port>]/<schema>; a host that is already a URL is used as such.
In the URI form a query string becomes the connection's extra (`...?notify_promotions=true`), not part of the URL.

In a DAG:
    from dreamline.notify import on_failure, on_promotion
    DAG(..., default_args={"on_failure_callback": on_failure})
    StepOperator(task_id="register", ..., on_success_callback=on_promotion)
A webhook that is down or answers an error is logged as one warning: a notification never fails or retries a task.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from airflow.sdk import BaseNotifier, Connection
from airflow.sdk.exceptions import AirflowNotFoundException

DEFAULT_CONN_ID = "dreamline_webhook"
TIMEOUT_S = 5
MAX_ERROR_CHARS = 500


def webhook_url(conn: Connection) -> str:
    """The webhook's URL from the connection's conn_type, host, port and schema (its path)."""
    host = (conn.host or "").rstrip("/")
    if "://" not in host:
        host = f"{conn.conn_type if conn.conn_type in ('http', 'https') else 'https'}://{host}"
    port = f":{conn.port}" if conn.port else ""
    return f"{host}{port}" + (f"/{conn.schema.lstrip('/')}" if conn.schema else "")


def error_line(error: BaseException | str | None) -> str:
    """First non-empty line of the task's exception (the step's `error: <step>: <reason>` line), truncated."""
    text = str(error or "").strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 1] + "…"


def task_fields(context) -> dict[str, Any]:
    """Where it happened: DAG, task, map index (None when not mapped), run, try and a link to the task's log."""
    ti = context["ti"]
    map_index = ti.map_index if ti.map_index is not None and ti.map_index >= 0 else None
    return {"dag_id": ti.dag_id, "task_id": ti.task_id, "map_index": map_index, "run_id": ti.run_id,
            "try_number": ti.try_number, "log_url": ti.log_url}


def task_label(context) -> str:
    """`train [lr=0.0001]`: the task id and, for a mapped task, its rendered map index (or its number)."""
    ti = context["ti"]
    if ti.map_index is None or ti.map_index < 0:
        return ti.task_id
    return f"{ti.task_id} [{getattr(ti, 'rendered_map_index', None) or ti.map_index}]"


class WebhookNotifier(BaseNotifier):
    """Posts a task's failure to the webhook of the connection `conn_id`; sends nothing when it does not exist."""

    event = "failure"

    def __init__(self, conn_id: str = DEFAULT_CONN_ID):
        super().__init__()
        self.conn_id = conn_id

    def payload(self, context, conn: Connection) -> dict[str, Any] | None:
        fields, error = task_fields(context), error_line(context.get("exception"))
        text = f"{fields['dag_id']} task {task_label(context)} failed: {error} {fields['log_url']}"
        return {"event": self.event, **fields, "error": error, "text": text}

    def notify(self, context) -> None:
        try:
            conn = Connection.get(self.conn_id)
        except AirflowNotFoundException:
            self.log.info("No connection %s: no %s notification sent", self.conn_id, self.event)
            return
        except Exception as exc:  # noqa: BLE001 (a malformed connection must not fail the task either)
            self.log.warning("Connection %s unusable (%s): no %s notification sent",
                             self.conn_id, type(exc).__name__, self.event)
            return
        try:
            payload = self.payload(context, conn)
            if payload is not None:
                self.post(conn, payload)
        except Exception as exc:  # noqa: BLE001 (never fail or retry a task over a notification)
            self.log.warning("%s notification to connection %s not delivered: %s",
                             self.event, self.conn_id, describe(exc))

    def post(self, conn: Connection, payload: dict[str, Any]) -> None:
        body = json.dumps(payload)
        headers = {"Content-Type": "application/json", "User-Agent": "dreamline-notify"}
        if conn.password:
            body = body.replace(conn.password, "***")  # the token goes in the header, never in the body
            headers["Authorization"] = f"Bearer {conn.password}"
        request = urllib.request.Request(webhook_url(conn), data=body.encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status = response.status
        self.log.info("%s notification sent to connection %s (HTTP %s)", self.event, self.conn_id, status)


class PromotionNotifier(WebhookNotifier):
    """Posts a promotion when the task's XCom result says `promoted` and the connection's extra has
    `"notify_promotions": true`. For the `register` task's on_success_callback."""

    event = "promotion"

    def payload(self, context, conn: Connection) -> dict[str, Any] | None:
        if str(conn.extra_dejson.get("notify_promotions", "")).lower() != "true":
            return None
        ti = context["ti"]
        result = ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index)
        if not isinstance(result, dict) or not result.get("promoted"):
            return None
        fields = task_fields(context)
        model = {k: result.get(k) for k in ("model_name", "version", "reason", "aliases")}
        text = (f"{fields['dag_id']}: {model['model_name']} version {model['version']} promoted "
                f"({', '.join(model['aliases'] or [])}): {model['reason']} {fields['log_url']}")
        return {"event": self.event, **fields, **model, "text": text}


def describe(exc: BaseException) -> str:
    """An HTTP status or a network reason; not the exception's text, which may carry the URL (a secret for many
    incoming webhooks)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return f"unreachable ({reason.strerror if isinstance(reason, OSError) and reason.strerror else 'no reply'})"
    return type(exc).__name__


on_failure = WebhookNotifier()
on_promotion = PromotionNotifier()
