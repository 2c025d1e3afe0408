"""Evaluated checkpoints as MLflow LoggedModels of their training runs, on the real sqlite store (no models, fast)."""
from __future__ import annotations

import pytest

from sd_tasks.core import tracking

# score of (learning rate, step): the best checkpoint is lr 1e-4 at step 200
SCORES = {(1e-4, 100): 0.40, (1e-4, 200): 0.90, (5e-5, 100): 0.20, (5e-5, 200): 0.60}


@pytest.fixture
def sweep(home, request):
    """A parent run and one training run per learning rate, in an experiment of this test's own."""
    experiment = f"logged-models-{request.node.name}"
    parent = tracking.find_or_create_run(experiment, "parent", "parent")
    runs = {lr: tracking.find_or_create_run(experiment, f"parent:lr={lr:g}", f"lr={lr:g}", parent_run_id=parent)
            for lr in (1e-4, 5e-5)}
    return tracking.experiment_id(experiment), runs


def log(runs, lr, step, **kwargs):
    score = SCORES[(lr, step)]
    return tracking.log_checkpoint_model(
        runs[lr], step=step, learning_rate=lr, uri=f"file:///runs/x/train/lr-{lr:g}/checkpoint-{step}",
        metrics={"dino": score - 0.1, "clip_i": score - 0.2, "score": score}, **kwargs)


def test_checkpoints_become_logged_models_ranked_by_score(sweep):
    import mlflow

    experiment, runs = sweep
    ids = {(lr, step): log(runs, lr, step) for lr, step in SCORES}
    assert len(set(ids.values())) == 4

    c = tracking.client()
    for (lr, step), model_id in ids.items():
        model = c.get_logged_model(model_id)
        assert model.source_run_id == runs[lr]
        assert model.name == tracking.checkpoint_model_name(lr, step)
        assert model.model_type == "lora-checkpoint"
        assert model.status == "READY"
        assert model.params == {"learning_rate": f"{lr:g}", "step": str(step),
                                "checkpoint": f"file:///runs/x/train/lr-{lr:g}/checkpoint-{step}"}
        assert {m.key: (m.value, m.step, m.run_id) for m in model.metrics} == {
            "eval/dino": (pytest.approx(SCORES[(lr, step)] - 0.1), step, runs[lr]),
            "eval/clip_i": (pytest.approx(SCORES[(lr, step)] - 0.2), step, runs[lr]),
            "eval/score": (SCORES[(lr, step)], step, runs[lr])}
    # each training run lists its own two checkpoints as outputs, at their steps
    for lr, run_id in runs.items():
        outputs = c.get_run(run_id).outputs.model_outputs
        assert sorted((o.model_id, o.step) for o in outputs) == sorted(
            (ids[(lr, s)], s) for s in (100, 200))

    ranked = mlflow.search_logged_models(
        experiment_ids=[experiment], filter_string="model_type = 'lora-checkpoint'",
        order_by=[{"field_name": "metrics.eval/score", "ascending": False}], output_format="list")
    assert [m.model_id for m in ranked] == [ids[k] for k in sorted(SCORES, key=SCORES.get, reverse=True)]
    assert ranked[0].name == "lr-0_0001-step-200"

    good = mlflow.search_logged_models(experiment_ids=[experiment], filter_string="metrics.`eval/score` > 0.5",
                                       output_format="list")
    assert {m.model_id for m in good} == {ids[(1e-4, 200)], ids[(5e-5, 200)]}


def test_a_retry_makes_no_duplicate(sweep):
    experiment, runs = sweep
    first = {(lr, step): log(runs, lr, step) for lr, step in SCORES}
    again = {(lr, step): log(runs, lr, step) for lr, step in SCORES}
    assert again == first

    c = tracking.client()
    assert len(c.search_logged_models([experiment])) == 4
    for run_id in runs.values():
        assert len(c.get_run(run_id).outputs.model_outputs) == 2
        for key in ("eval/dino", "eval/clip_i", "eval/score"):  # one entry per step in the run's history
            assert sorted(m.step for m in c.get_metric_history(run_id, key)) == [100, 200]
    for model_id in first.values():
        assert len(c.get_logged_model(model_id).metrics) == 3


def test_a_retry_scoring_differently_keeps_the_first_value(sweep):
    _, runs = sweep
    model_id = log(runs, 1e-4, 100)
    again = tracking.log_checkpoint_model(runs[1e-4], step=100, learning_rate=1e-4, uri="file:///elsewhere",
                                          metrics={"score": 0.99, "preservation": 0.5})
    assert again == model_id

    c = tracking.client()
    assert [m.value for m in c.get_metric_history(runs[1e-4], "eval/score")] == [0.40]
    metrics = {m.key: m.value for m in c.get_logged_model(model_id).metrics}
    assert metrics["eval/score"] == 0.40 and metrics["eval/preservation"] == 0.5  # a new metric is added
    assert c.get_logged_model(model_id).params["checkpoint"].endswith("checkpoint-100")  # params left alone


def test_metrics_the_run_already_has_go_onto_the_model_without_a_second_entry(sweep):
    """A run whose evaluation logged `eval/...` itself (before LoggedModels): the model gets those entries."""
    _, runs = sweep
    c = tracking.client()
    c.log_metric(runs[5e-5], "eval/score", 0.25, step=100)
    model_id = log(runs, 5e-5, 100)

    history = c.get_metric_history(runs[5e-5], "eval/score")
    assert [(m.step, m.value) for m in history] == [(100, 0.25)]
    on_model = {m.key: m for m in c.get_logged_model(model_id).metrics}
    assert (on_model["eval/score"].value, on_model["eval/score"].timestamp) == (0.25, history[0].timestamp)
    assert [m.step for m in c.get_metric_history(runs[5e-5], "eval/dino")] == [100]


def test_an_attempt_interrupted_between_model_and_run_is_completed(sweep):
    """MLflow writes a metric with a model id to the model first, then to the run: the retry fills in the run."""
    from mlflow.entities import Metric

    experiment, runs = sweep
    model_id = log(runs, 1e-4, 200)
    c = tracking.client()
    store = c._tracking_client.store
    # a second checkpoint whose attempt stopped after the model got `eval/score`, before the run did
    model = c.create_logged_model(experiment, name=tracking.checkpoint_model_name(1e-4, 100),
                                  source_run_id=runs[1e-4], model_type="lora-checkpoint")
    store._log_model_metrics(runs[1e-4], [Metric("eval/score", 0.40, 1234, 100, model_id=model.model_id,
                                                 run_id=runs[1e-4])], experiment_id=experiment)
    assert log(runs, 1e-4, 100) == model.model_id != model_id

    history = c.get_metric_history(runs[1e-4], "eval/score")
    assert sorted((m.step, m.value, m.timestamp) for m in history if m.step == 100) == [(100, 0.40, 1234)]
    assert sorted((m.key, m.timestamp) for m in c.get_logged_model(model.model_id).metrics
                  if m.key == "eval/score") == [("eval/score", 1234)]
    assert c.get_logged_model(model.model_id).status == "READY"
