"""The MLflow run of one training run (one learning rate): opened or continued by key, its params once, metrics
buffered and written in batches, FAILED with the error when training raises; and the cost and memory figures it
ends with. Split from sd_tasks.train so the training loop's module holds the loop.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict

import torch

from sd_tasks import tracking


class training_run:
    """The MLflow run of one learning rate, nested under the pipeline's parent run; FAILED if training raises.
    Only the main process of a multi-GPU run logs."""

    FLUSH_SECONDS = 10.0

    def __init__(self, config: TrainConfig, enabled: bool = True):
        self.config, self.enabled, self.id = config, enabled, None
        self._pending, self._flushed = [], time.monotonic()

    def __enter__(self):
        import mlflow

        if not self.enabled:
            return self

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
        return self

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
            self._pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
            if time.monotonic() - self._flushed > self.FLUSH_SECONDS:
                self.flush()

    def flush(self) -> None:
        if self.enabled and self._pending:
            self._client.log_batch(self.id, metrics=self._pending)
            self._pending, self._flushed = [], time.monotonic()

    def __exit__(self, exc_type, exc, tb):
        import mlflow

        if not self.enabled:
            return False
        try:
            self.flush()  # also when failing: the loss up to the step that diverged is what one wants to see
            if exc_type:  # why, where the sweep is reviewed
                mlflow.set_tag("dreamline.error", (str(exc) or exc_type.__name__)[:5000])
            elif self._earlier_error:  # an earlier attempt failed; this one, resumed, did not
                self._client.delete_tag(self.id, "dreamline.error")
        except Exception as logging_failed:  # the tracking server is down: keep training's own outcome
            if exc_type is None:
                raise
            print(f"warning: MLflow: {logging_failed}", file=sys.stderr)
        finally:
            mlflow.end_run("FAILED" if exc_type else "FINISHED")
        return False


def cost(seconds: float, processes: int, gpu_hour_price: float) -> dict:
    gpu_seconds = seconds * processes if torch.cuda.is_available() else 0.0
    return {"train_seconds": seconds, "gpu_seconds": gpu_seconds,
            "estimated_cost": gpu_seconds / 3600 * gpu_hour_price}


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
