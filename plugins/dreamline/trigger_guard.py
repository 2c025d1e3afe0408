"""The API server refuses a trigger that names a setting the DAG does not have (`max_step` for `max_steps`), with
the closest name, before a run exists: Airflow itself accepts any conf key and the run would ignore it.

An ASGI middleware on Airflow's API server (plugins/dreamline_plugin.py registers it), so it covers every way a run
is triggered over HTTP: the REST API and the UI's trigger form with its JSON editor, which posts to the same
endpoint. Only DAGs tagged `dreamline` are checked, against the Params of their latest serialized version.
"""
from __future__ import annotations

import json
import re

from dreamline.plan import unknown_setting

TRIGGER = re.compile(r"/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?$")


def param_names(dag_id: str) -> frozenset[str] | None:
    """The Params of a Dreamline DAG as the scheduler knows it; None for another DAG, or one not parsed yet."""
    from airflow.models.serialized_dag import SerializedDagModel

    dag = SerializedDagModel.get_dag(dag_id)
    if dag is None or "dreamline" not in (dag.tags or ()):
        return None
    return frozenset(dag.params)


class RefuseUnknownSettings:
    """Answers 400 (FastAPI's `{"detail": ...}`) to a POST that triggers a Dreamline DAG with a conf key it does not
    know; every other request passes through untouched, its body replayed as read."""

    def __init__(self, app, names=param_names):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        match = TRIGGER.search(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        said = await self.refusal(match["dag_id"], body)
        if said is not None:
            payload = json.dumps({"detail": said}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            return await send({"type": "http.response.body", "body": payload})

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refusal(self, dag_id: str, body: bytes) -> str | None:
        from starlette.concurrency import run_in_threadpool

        try:
            conf = json.loads(body or b"{}").get("conf")
        except (ValueError, AttributeError):
            return None  # not a JSON object: Airflow's own validation answers
        if not isinstance(conf, dict) or not conf:
            return None
        known = await run_in_threadpool(self.names, dag_id)
        return None if known is None else unknown_setting(conf, known)
