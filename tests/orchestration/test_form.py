"""The trigger form refuses bad input before a run starts (its Params' JSON schema, as the UI and the REST API apply
it); the first task refuses what JSON schema cannot say; values reach the steps with their types, never as flags."""
from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
from airflow.sdk.definitions.param import ParamValidationError

from conftest import REPO
from dreamline import plan
from dreamline.params import DREAMBENCH_PROMPTS
from dreamline.operators import STEP_RETRY_POLICY, StepCrashed, StepRefused, step_argv
from sd_tasks import cli
from sd_tasks.data import caption
from sd_tasks.evaluation import evaluate


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags")).dags["lora_dog"]


def form(dag, **conf) -> dict:
    """The run's params as Airflow validates a trigger's conf."""
    params = copy.deepcopy(dag.params)
    params.update(conf)
    return params.validate()


@pytest.mark.parametrize("conf", [
    {"learning_rates": [1e-4, 1e-4]},  # one training run per value: a duplicate would share its folder and run
    {"learning_rates": [0]}, {"learning_rates": [-1e-4]}, {"learning_rates": []},
    {"resolution": 1000},  # not a multiple of 64
    {"evaluation_prompts": ["a photo of a dog"]},  # no {instance}
    {"evaluation_prompts": ["a {instance} in {place}"]},  # an unknown field: it would fail after training
    {"evaluation_prompts": ["a {instance.__class__}"]}, {"evaluation_prompts": ["a {instance:>40}"]},
    {"dataset_version": ""}, {"dataset_version": "main --force"},
    {"subject": "cat"},  # another subject's lineage is not this DAG's
    {"max_steps": "500"}, {"force": "yes"}, {"train_text_encoder": "yes"},  # the wrong type
    {"sweep_strategy": "random"}, {"halving_keep": 0}, {"halving_keep": 1.5}, {"halving_rungs": [100, 200, 300]},
])
def test_the_form_refuses(dag, conf):
    with pytest.raises(ParamValidationError):
        form(dag, **conf)


@pytest.mark.parametrize("conf, message", [
    ({"max_steps": 450}, "not a multiple of the checkpoint interval"),
    ({"max_steps": 5000, "checkpointing_steps": 10}, "500 checkpoints per learning rate; at most 20"),
    ({"learning_rates": [1e-4, 1.0000001e-4]}, "would share the run folder lr-0.0001"),
    ({"sweep_strategy": "halving", "halving_rungs": [300, 100]}, r"halving rungs \[300, 100\]: ascending"),
    ({"sweep_strategy": "halving", "halving_rungs": [500]}, "each below max_steps 500"),
    ({"sweep_strategy": "halving", "halving_rungs": [150]}, "rung 150 is not a multiple of the checkpoint interval"),
    ({"evaluation_prompts": ["a {instance}"] * 3}, r"evaluation_prompts: 3 given, at least 4 \(half choose"),
])
def test_the_first_task_refuses_what_json_schema_cannot_say(dag, conf, message):
    with pytest.raises(plan.RecipeError, match=message):
        plan.check_recipe(form(dag, **conf))


def test_a_good_form_passes_and_its_recipe_fingerprint_ignores_what_does_not_change_training(dag):
    checked = plan.check_recipe(form(dag))
    assert checked["training_runs"] == 3 and checked["evaluations"] == 3 * 5 + 2  # and the champion, the base model
    same = plan.check_recipe(form(dag, force=True, dataset_version="dog-v2", encode_shard_size=10,
                                  require_approval=True, promotion_margin=0.5, promotion_confidence=0.9,
                                  inference_steps=20, screening_prompts=8, weight_flexibility=2.0,
                                  evaluation_prompts=["a {instance}"] * 4, confirmation_images_per_prompt=8))
    other = plan.check_recipe(form(dag, max_steps=400))
    halving = plan.check_recipe(form(dag, sweep_strategy="halving"))
    assert same["recipe_hash"] == checked["recipe_hash"] != other["recipe_hash"] != halving["recipe_hash"]


def test_the_form_offers_text_encoder_training_off_by_default_and_train_gets_it(dag):
    from sd_tasks.training import train

    dataset = {"rev": "r", "commit": "c", "hash": "h"}
    off = plan.training_options(form(dag), "/run", dataset, "/cache", "p", None)
    on = plan.training_options(form(dag, train_text_encoder=True), "/run", dataset, "/cache", "p", None)
    assert [o["train_text_encoder"] for o in off] == [False] * 3 and [o["train_text_encoder"] for o in on] == [True] * 3
    parser = cli.build_parser("train", train.TrainConfig)
    for options, wanted in ((on[0], True), (off[0], False)):
        argv = step_argv("train", options)
        assert cli.make_config(train.TrainConfig, parser.parse_args(argv[1:]), parser).train_text_encoder is wanted
    # another recipe: a night with text encoders is not "nothing changed" after one without
    assert plan.check_recipe(form(dag, train_text_encoder=True))["recipe_hash"] != \
        plan.check_recipe(form(dag))["recipe_hash"]


def test_halving_stages_train_each_rate_to_its_rung_and_the_kept_ones_on(dag):
    params = form(dag, sweep_strategy="halving")  # rungs 100 and 300 of 500, half kept
    assert plan.sweep_stages(params) == [100, 300, 500] and plan.sweep_stages(form(dag)) == [500]
    first = plan.training_options(params, "/run", {"rev": "r", "commit": "c", "hash": "h"}, "/cache", "p", None)
    assert [o["stop_at_step"] for o in first] == [100] * 3
    assert plan.training_options(form(dag), "/run", {"rev": "r", "commit": "c", "hash": "h"}, "/cache", "p",
                                 None)[0]["stop_at_step"] is None  # a grid trains to max_steps
    results = [{"learning_rate": lr} for lr in params["learning_rates"]]
    [halve] = plan.halving_options(params, "/run", 1, results)
    assert (halve["rung"], halve["keep"], halve["max_steps"]) == (100, 0.5, 500)
    assert plan.halving_options(params, "/run", 3, results) == [] == plan.halving_options(form(dag), "/run", 1, results)
    kept = plan.continued_training(params, 1, first, [5e-4, 1e-4])
    assert [(o["learning_rate"], o["stop_at_step"]) for o in kept] == [(1e-4, 300), (5e-4, 300)]
    assert [o["stop_at_step"] for o in plan.continued_training(params, 2, first, [1e-4])] == [None]
    assert [o["output"] for o in kept] == ["/run/train/lr-0.0001", "/run/train/lr-0.0005"]  # resumed where they were


def rendered_options(dag, task_id: str, **conf) -> dict:
    """A task's options as Airflow renders them when the task runs."""
    task = dag.task_dict[task_id]
    no_results = SimpleNamespace(xcom_pull=lambda **_: None)  # the tasks before it have returned nothing
    context = {"params": form(dag, **conf), "run_id": "manual__1", "dag": dag, "ti": no_results, "task": task}
    return task.render_template(task.options, context, dag.get_template_env())


def test_values_keep_their_types(dag):
    options = rendered_options(dag, "dataset", dataset_version="1.10")
    assert options["rev"] == "1.10" and step_argv("dataset", options)[2] == "--rev=1.10"
    assert rendered_options(dag, "dataset", dataset_version="None")["rev"] == "None"  # not None: not left out
    resize = rendered_options(dag, "resize", resolution=128, no_upscale=True)
    assert resize["resolution"] == 128 and resize["no_upscale"] is True
    assert "--no-upscale" in step_argv("resize", resize) and "--resolution=128" in step_argv("resize", resize)


@pytest.mark.parametrize("key, hint", [("max_step", "; did you mean max_steps?"),
                                       ("learning_rate", "; did you mean learning_rates?"), ("zzz", "")])
def test_a_setting_the_dag_does_not_know_is_refused_with_the_closest_name(dag, key, hint):
    """A typo in a trigger's conf (REST API, the form's JSON editor) is refused before any work, naming the closest
    setting, instead of being ignored (and changing the recipe's fingerprint, so the night retrained for nothing)."""
    params = {**form(dag), key: 300}
    with pytest.raises(plan.RecipeError, match=rf"^{key}: not a setting of this DAG{re.escape(hint)} \("):
        plan.check_recipe(params, frozenset(dag.params))
    assert plan.check_recipe(form(dag), frozenset(dag.params))["training_runs"] == 3


def test_confirmation_judges_on_prompts_and_seeds_selection_never_saw(dag, tmp_path):
    """Selection and confirmation split the prompt set (even positions choose, the others confirm); preservation is
    confirmed on the held-out prompts with the class noun; the confirmation seeds are past selection's range and
    rotate with the dataset's content."""
    params = form(dag)
    [chosen] = plan.evaluation_options({**params, "learning_rates": [1e-4]}, str(tmp_path), [
        {"learning_rate": 1e-4, "checkpoints": [{"step": 100, "uri": "c"}]}], {"checkpoint": None})[:1]
    confirm = plan.confirmation_options(params, str(tmp_path), {"checkpoint": "c"}, {"checkpoint": None}, "md5:aa")
    # DreamBench's 25: 13 select (6 of them spread over the list screen every checkpoint), 12 confirm
    selection = [p.format(instance="sks dog", class_noun="dog") for p in DREAMBENCH_PROMPTS["live"][0::2]]
    assert chosen["prompts"] == [selection[i] for i in (0, 2, 4, 6, 8, 10)] and len(confirm["prompts"]) == 12
    assert not set(selection) & set(confirm["prompts"])
    # screening is cheap (few steps with a fast solver); the confirmation spends the full protocol
    assert (chosen["num_inference_steps"], chosen["scheduler"], chosen["images_per_prompt"]) == \
        (12, "DPMSolverMultistepScheduler", 2)
    assert (confirm["num_inference_steps"], confirm["scheduler"], confirm["images_per_prompt"]) == (25, None, 4)
    assert all("sks dog" in p for p in confirm["prompts"]) and chosen["identifier"] == confirm["identifier"] == "sks"
    assert confirm["class_prompts"] == [p.replace("sks dog", "dog") for p in confirm["prompts"]]
    assert chosen["class_prompts"] == [params["class_prompt"]]
    seeds = {plan.confirmation_seed(params["seed"], f"md5:{i}") for i in range(50)}
    assert len(seeds) > 40  # rotating with the dataset
    assert confirm["seed"] == plan.confirmation_seed(params["seed"], "md5:aa")  # the same data, the same seeds
    for seed in seeds:  # every rotation lies past selection's seeds (seed + 1000 * prompt + image)
        assert seed - params["seed"] >= plan.CONFIRMATION_SEED_OFFSET and \
            (seed - params["seed"]) % plan.CONFIRMATION_SEED_OFFSET == 0


def test_a_value_that_looks_like_a_flag_stays_a_value(dag, tmp_path):
    options = rendered_options(dag, "caption", instance_prompt="--cache /tmp/x")
    argv = step_argv("caption", options)
    parser = cli.build_parser("caption", caption.CaptionConfig)
    assert cli.make_config(caption.CaptionConfig, parser.parse_args(argv[1:]), parser).instance_prompt == \
        "--cache /tmp/x"
    params = form(dag, evaluation_prompts=["--cache /tmp/x {instance}", "a {instance}", "a {instance} on a beach",
                                           "a {instance} in snow"])
    [first, *_] = plan.evaluation_options(params, str(tmp_path), [{"learning_rate": 1e-4, "checkpoints": [
        {"step": 100, "uri": "c"}]}], {"checkpoint": None})
    argv = step_argv("evaluate", first)
    parser = cli.build_parser("evaluate", evaluate.EvaluateConfig)
    config = cli.make_config(evaluate.EvaluateConfig, parser.parse_args(argv[1:]), parser)
    assert config.prompts == ["--cache /tmp/x sks dog", "a sks dog on a beach"]
    assert config.cache == first["cache"]  # the prompt did not set --cache


def test_retries_fit_the_error():
    refused = STEP_RETRY_POLICY.evaluate(StepRefused("error: validate: no images"), 1, 3)
    crashed = STEP_RETRY_POLICY.evaluate(StepCrashed("error: train: killed"), 1, 3)
    other = STEP_RETRY_POLICY.evaluate(TimeoutError("pod did not start"), 1, 3)
    assert (refused.action.value, crashed.action.value, other.action.value) == ("fail", "retry", "default")
