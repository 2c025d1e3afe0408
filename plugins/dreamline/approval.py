"""The reviewer's approval, waiting no longer than the run's time limit allows.

A version that earned promotion waits for a person (Airflow's Human-in-the-loop `ApprovalOperator`). Its wait is
configured per subject (`approval_timeout_hours`), but it starts only after training and evaluation, whose length
varies: a fixed wait could outlast the run's own limit (`dagrun_timeout`), and a run that times out while waiting
fails instead of keeping the champion, and the next nights skip as "nothing changed". So the wait is cut, when the
run starts it, to end `END_MARGIN` before the run's limit: no answer by then is Reject, the champion stays, and the
run ends cleanly.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.providers.standard.operators.hitl import ApprovalOperator

END_MARGIN = timedelta(minutes=15)  # for the answer to land, `promote` and closing the MLflow run
SHORTEST = timedelta(minutes=1)  # a wait never shorter: a reviewer who is there can still answer


def approval_window(configured: timedelta | None, started: datetime | None, run_timeout: timedelta | None,
                    now: datetime) -> timedelta | None:
    """The wait: `configured`, cut to end END_MARGIN before the run's limit (`started` + `run_timeout`)."""
    if started is None or run_timeout is None:
        return configured
    left = max(started + run_timeout - END_MARGIN - now, SHORTEST)
    return left if configured is None else min(configured, left)


class RunBoundApproval(ApprovalOperator):
    """`ApprovalOperator` whose response timeout ends inside the run's time limit (see the module docstring)."""

    def execute(self, context):
        configured = self.response_timeout
        self.response_timeout = approval_window(configured, context["dag_run"].start_date,
                                                context["dag"].dagrun_timeout, datetime.now(timezone.utc))
        if self.response_timeout != configured:
            self.log.info("Waiting %s for an answer, not %s: the run's time limit comes first",
                          self.response_timeout, configured)
        return super().execute(context)
