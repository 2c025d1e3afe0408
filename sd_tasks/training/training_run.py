"""The MLflow run of one training run (one learning rate): opened or continued by key, its params once, metrics
buffered and written in batches, FAILED with the error when training raises; and the cost and memory figures it
ends with. Split from sd_tasks.training.train so the training loop's module holds the loop.

A tracking server that stops answering does not stop training: a batch is sent with a short timeout and no retries
while training runs; one that fails stays buffered and is also written to a spool file in the output folder
(`SPOOL`), which train flushes before every checkpoint, so a whole checkpoint's steps are in MLflow or in the spool.
The run's last flush retries as MLflow is configured to; if the server is still down, the step fails in one line
and its retry (or a resumed run) sends the spool first. A step's loss is sent once: the steps MLflow already has
are not sent again, whichever attempt trained them.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from sd_tasks.core import tracking
from sd_tasks.core.errors import Unavailable
from sd_tasks.core.storage import join, list_dir, read_json, remove_file, write_file

SPOOL = "mlflow-unsent-metrics.json"  # in the training output: metrics the tracking server did not take
STEPPED = ("loss", "lr")  # per-step metrics: those a resumed run may train, and log, again


class training_run:
    """The MLflow run of one learning rate, nested under the pipeline's parent run; FAILED if training raises.
    Only the main process of a multi-GPU run logs."""

    FLUSH_SECONDS = 10.0
    SEND_TIMEOUT = 5  # seconds a batch may take while training runs: a stopped server must not stop training
    LAST_SEND = (30, 2)  # timeout and retries of the last batch: about a minute, not MLflow's default minutes

    def __init__(self, config: TrainConfig, enabled: bool = True):
        self.config, self.enabled, self.id = config, enabled, None
        self._pending, self._sent, self._flushed, self._spooled = {}, set(), time.monotonic(), False
        self.unreachable = None  # why the last send failed
        self._spool = join(config.output, SPOOL)

    def __enter__(self):
        import mlflow

        if not self.enabled:
            return self

        try:  # a server that does not answer fails the step in about a minute, in one line: its retry can succeed
            with _bounded_requests(*self.LAST_SEND):
                self._open()
        except Exception as exc:
            if not _unreachable(exc):
                raise
            with _bounded_requests(self.SEND_TIMEOUT, 0), contextlib.suppress(Exception):
                mlflow.end_run("FAILED")  # forget a run already started: mlflow's exit hook would wait minutes
            raise Unavailable(f"MLflow at {tracking.tracking_uri()}: unreachable ({exc})".splitlines()[0][:400]) \
                from None
        return self

    def _open(self) -> None:
        import mlflow

        self._client = tracking.client()  # also points mlflow at the tracking URI
        # Keyed by where the checkpoints go: a retried or resumed training continues its own MLflow run.
        key = f"{self.config.parent_run_id or 'standalone'}:{self.config.output}"
        self.id = tracking.find_or_create_run(
            self.config.experiment, key, f"lr={self.config.learning_rate:g}",
            tags={"dreamline.learning_rate": f"{self.config.learning_rate:g}", **tracking.parse_tags(self.config.tags)},
            parent_run_id=self.config.parent_run_id)
        earlier = mlflow.start_run(run_id=self.id).data  # what an earlier attempt of this training logged
        self._earlier_error = "dreamline.error" in earlier.tags
        self._log_params({k: str(v) for k, v in asdict(self.config).items()
                          if k not in ("parent_run_id", "tags", "stop_at_step")},  # a rung is not a setting
                         logged=earlier.params)
        self._sent = {(k, m.step) for k in STEPPED if k in earlier.metrics
                      for m in self._client.get_metric_history(self.id, k)}
        if SPOOL in list_dir(self.config.output):  # an earlier attempt's metrics the server did not take
            from mlflow.entities import Metric

            self._spooled = True
            for key, value, timestamp, step in read_json(self._spool)["metrics"]:
                self._add(Metric(key, value, timestamp, step))
            self.flush()

    @staticmethod
    def _log_params(params: dict[str, str], logged: dict[str, str]) -> None:
        """A resumed run logs its params once; MLflow forbids changing one, so a value changed on resuming (say, a
        larger max_steps to train on) is recorded as a `dreamline.resumed_with.<param>` tag instead."""
        import mlflow

        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            mlflow.set_tags({f"dreamline.resumed_with.{k}": v for k, v in changed.items()})

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        """Buffered, with each value's own timestamp, and written in one batch every FLUSH_SECONDS. A write per step
        costs about 10 ms against sqlite, as much as a small model's step, and an asynchronous one competes with the
        training thread for the interpreter and slowed every sixth step or so by half."""
        from mlflow.entities import Metric

        if self.enabled:
            now = int(time.time() * 1000)
            for key, value in metrics.items():
                self._add(Metric(key, float(value), now, step))
            if time.monotonic() - self._flushed > self.FLUSH_SECONDS:
                self.flush()

    def _add(self, metric) -> None:
        """The first value of a per-step metric stands: a resumed run trains its steps after the checkpoint again."""
        slot = (metric.key, metric.step)
        if metric.key in STEPPED and (slot in self._sent or slot in self._pending):
            return
        self._pending[slot] = metric

    def flush(self, last: bool = False) -> None:
        """Send what is buffered. While training runs (not `last`) a failure is a warning: the metrics stay buffered
        and are spooled to the output folder. The last flush that fails raises Unavailable (the step's retry sends
        the spool)."""
        if not (self.enabled and self._pending):
            return
        self._flushed = time.monotonic()
        try:
            with _bounded_requests(*(self.LAST_SEND if last else (self.SEND_TIMEOUT, 0))):
                while self._pending:  # MLflow takes at most 1000 metrics a batch; a long outage spools more
                    batch = dict(list(self._pending.items())[:1000])
                    self._client.log_batch(self.id, metrics=list(batch.values()))
                    self._sent |= {slot for slot in batch if slot[0] in STEPPED}
                    self._pending = {k: v for k, v in self._pending.items() if k not in batch}
        except Exception as exc:
            self.unreachable = f"MLflow at {tracking.tracking_uri()}: {type(exc).__name__}: {exc}".splitlines()[0]
            write_file(self._spool, json.dumps({"metrics": [[m.key, m.value, m.timestamp, m.step]
                                                            for m in self._pending.values()]}).encode())
            self._spooled = True
            if last:
                raise Unavailable(f"{self.unreachable[:300]}; {len(self._pending)} metrics kept in {self._spool} "
                                  f"for the retry") from None
            print(f"warning: {self.unreachable[:300]}; training goes on, metrics kept in {self._spool}",
                  file=sys.stderr)
            return
        self.unreachable = None
        if self._spooled:
            remove_file(self._spool)
            self._spooled = False

    def __exit__(self, exc_type, exc, tb):
        import mlflow

        if not self.enabled:
            return False
        try:
            self.flush(last=True)  # also when failing: the loss up to the step that diverged is what one wants
            if exc_type:  # why, where the sweep is reviewed
                mlflow.set_tag("dreamline.error", (str(exc) or exc_type.__name__)[:5000])
            elif self._earlier_error:  # an earlier attempt failed; this one, resumed, did not
                self._client.delete_tag(self.id, "dreamline.error")
        except Exception as logging_failed:  # the tracking server is down: keep training's own outcome
            if exc_type is None:
                raise
            print(f"warning: MLflow: {logging_failed}", file=sys.stderr)
        finally:
            if not self.unreachable:
                mlflow.end_run("FAILED" if exc_type else "FINISHED")
            else:  # one short try (end_run forgets the run first, so mlflow's exit hook waits on no dead server)
                with _bounded_requests(self.SEND_TIMEOUT, 0), contextlib.suppress(Exception):
                    mlflow.end_run("FAILED")  # the step fails: its retry sends the spool and ends the run
        return False


@contextlib.contextmanager
def _bounded_requests(timeout: int, retries: int):
    """MLflow's HTTP client reads its timeout and retries from the environment on every request (defaults: 120 s, 7
    retries with exponential backoff): these bounds for the requests made inside."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    os.environ.update(MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout), MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(retries))
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _unreachable(exc: Exception) -> bool:
    """MLflow's client reports a server it cannot reach as an MlflowException raised while handling requests' error."""
    import requests

    return isinstance(exc.__context__, requests.RequestException) or isinstance(exc, requests.RequestException)


def cost(seconds: float, processes: int, gpu_hour_price: float) -> dict:
    gpu_seconds = seconds * processes if torch.cuda.is_available() else 0.0
    return {"train_seconds": seconds, "gpu_seconds": gpu_seconds,
            "estimated_cost": gpu_seconds / 3600 * gpu_hour_price}
