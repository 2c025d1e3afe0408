"""
### SDXL DreamBooth-LoRA: from a versioned folder of photos to a registered, evaluated LoRA

One DAG per subject of the subject registry (`dags/subjects.yaml`, or the registry DREAMLINE_SUBJECTS names), on
the subject's schedule (nightly by default) and, where the subject asks for it, whenever a new version of its
dataset is published; or on **Trigger** with the form below. A run:

1. **recipe**: checks what the form's rules cannot (max steps a multiple of the checkpoint interval, how many
   checkpoints and evaluations) in seconds;
2. **models**: resolves every Hugging Face model the run uses (base model, evaluators, VAE) to one commit and
   fetches it into the model cache: every later step, cache, tag and the registered version names `id@sha`, and a
   hub that cannot be reached (with nothing cached) fails the night here, in one line;
   **dataset**: fetches the subject's images at the chosen version of the DVC data registry (rev, commit and
   content hash are recorded on every MLflow run and on the registered version; a subject of kind person is
   refused here without a consent record that covers training, and the record's id goes wherever the dataset's
   does); **champion** fetches the current
   champion, early, so a registry that cannot be reached fails the night before any GPU is used;
3. **lineage**: compares what it would train (dataset content, recipe, base model commit, code version) with what the
   champion and the latest challenger were trained from: when nothing changed, the run ends here, skipped, and
   says why (tick *Train even if nothing changed* to train anyway);
4. opens an MLflow parent run; **validate → caption → resize → encode**: checks every image, captions it, fits it
   to an SDXL bucket, and caches VAE latents and both text encoders' embeddings, in shards of *encode shard size*
   images, content-addressed so an unchanged dataset is not encoded again;
5. **train**: one DreamBooth-LoRA run per learning rate, in parallel up to the `gpu` pool's slots, a checkpoint
   every *checkpoint interval*; with *prior preservation*, also on class images the base model generates once
   (cached). A crashed or preempted step is retried with backoff and training resumes from its latest checkpoint;
   refused input and a diverging learning rate fail at once, the latter its own task only;
6. **evaluate**: every checkpoint of each learning rate that finished, the current champion and the base model
   alone, shared out over one task per GPU slot (each loads the pipeline and the evaluators once and swaps LoRA
   weights in place), on the same prompts and seeds (DINO, CLIP-I, CLIP-T, preservation of the base model's class images; every score
   kept per image, and normalised against the base model's so the weights mean what they say); with *Sweep
   strategy* halving, every rate first trains to the first rung only, and **rung_1**, **rung_2** keep the best
   fraction (`halve`), train them on from their rung checkpoint and evaluate the new checkpoints (skipped when the
   sweep has no such rung);
7. **select** the best checkpoint of the evaluations that succeeded (naming those missing; the parent run gets
   labelled image grids and metric plots); **confirm**: the selected checkpoint, the champion and the base model are
   scored again, in one process, on seeds selection never saw;
8. **register** it as a new version of `<subject>-sdxl-lora` with alias `challenger`, and move `champion` to it
   only if, image by image on the confirmation seeds, the bootstrap interval of its score minus the champion's lies
   above the margin (the first version: its subject fidelity minus the base model's);
9. with *Require a reviewer's approval*, a version that earned promotion waits in **approval** (Airflow's
   Required actions: the report, the interval and the grids; Approve or Reject; no answer keeps the champion) and
   **promote** moves `champion`; otherwise nothing waits;
10. closes the MLflow parent run (FAILED if the DAG run failed before registering).

Each task runs one `python -m sd_tasks <step>` command: a local process here, a Kubernetes pod on a GPU node in
production (`DREAMLINE_EXECUTOR=kubernetes`). Everything a run writes lives under one folder per DAG run; only small
JSON results travel through XCom; every try of every step records its seconds and GPUs under `cost/`, totalled
on the MLflow run and the registered version. Every step has a time limit and the whole run one (the subject's
`timeout_hours`), so a hung night cannot block the next. Review the sweep in MLflow: experiment `<subject>`, one
nested run per learning rate.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, TaskGroup, chain, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from dreamline import plan, subjects
from dreamline.approval import RunBoundApproval
from dreamline.deployment import DEPLOYMENT
from dreamline.notify import on_failure, on_promotion
from dreamline.operators import StepOperator, evaluation_folders, param, partial_step, pinned
from dreamline.params import MAX_RUNGS, dag_params

RUN = "{{ run_dir(dag.dag_id, run_id) }}"  # this DAG run's folder
PARENT_RUN_ID = "{{ ti.xcom_pull(task_ids='mlflow_run')['run_id'] }}"
REGISTERED = "ti.xcom_pull(task_ids='register')"  # register's result, inside templates
# The dataset's lineage, recorded on every MLflow run of the DAG run.
DATASET_TAGS = [
    "dataset.rev={{ ti.xcom_pull(task_ids='dataset')['rev'] }}",
    "dataset.commit={{ ti.xcom_pull(task_ids='dataset')['commit'] }}",
    "dataset.hash={{ ti.xcom_pull(task_ids='dataset')['hash'] }}",
    "consent.id={{ ti.xcom_pull(task_ids='dataset')['consent_id'] }}",
]


def schedule(subject: subjects.Subject):
    """The subject's cron, its dataset's Asset (a new version was published), both, or neither (manual only)."""
    cron = subject.schedule and CronTriggerTimetable(subject.schedule, timezone="UTC")
    dataset = subject.dataset_asset()
    if subject.on_new_data:
        return AssetOrTimeSchedule(timetable=cron, assets=[dataset]) if cron else [dataset]
    return cron


def lora_dag(subject: subjects.Subject):
    @dag(
        dag_id=subject.dag_id,
        schedule=schedule(subject),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        dagrun_timeout=timedelta(hours=subject.timeout_hours),
        doc_md=__doc__,
        params=dag_params(subject),
        user_defined_macros={"run_dir": DEPLOYMENT.run_dir},
        default_args={"on_failure_callback": on_failure},  # to the `dreamline_webhook` connection, if there is one
        tags=["dreamline", "sdxl", "lora", f"subject:{subject.name}"],
    )
    def lora():
        @task
        def recipe() -> dict:
            """What the form's JSON schema cannot refuse, refused in one line; and the recipe's fingerprint."""
            context = get_current_context()  # a conf key the DAG does not know (max_step) is refused, not ignored
            try:
                return plan.check_recipe({**context["params"], **(context["dag_run"].conf or {})},
                                         frozenset(context["dag"].params))
            except plan.RecipeError as exc:
                raise AirflowFailException(str(exc)) from None

        @task
        def models_to_pin() -> dict:
            """`pin-models` options: the form's model settings (dreamline.plan.models_to_pin)."""
            return plan.models_to_pin(*_params_and_run_dir())

        models = StepOperator(task_id="models", step="pin-models", options=models_to_pin())
        dataset = StepOperator(task_id="dataset", step="dataset", options={
            "repo": param("dataset_repo"), "rev": param("dataset_version"), "path": param("dataset_path"),
            "output": f"{RUN}/dataset", "consent": "required" if subject.kind == "person" else "optional",
        })
        champion = StepOperator(task_id="champion", step="champion", options={
            "model_name": subject.model_name, "output": f"{RUN}/champion",
        })
        lineage = StepOperator(task_id="lineage", step="lineage", options={
            "model_name": subject.model_name, "dataset": f"{RUN}/dataset", "base_model": pinned("base_model"),
            "recipe_hash": "{{ ti.xcom_pull(task_ids='recipe')['recipe_hash'] }}",
        })

        @task.short_circuit
        def anything_to_train(lineage: dict) -> bool:
            """False ends the run here, every later task skipped: nothing changed since the model was trained."""
            reason, force = lineage["reason"], get_current_context()["params"]["force"]
            if lineage["changed"] or force:
                print(f"training: {reason}{'' if lineage['changed'] else '; forced'}")
                return True
            print(f"nothing to train: {reason} (tick 'Train even if nothing changed' to train)")
            return False

        mlflow_run = StepOperator(task_id="mlflow_run", step="start-run", options={
            "experiment": param("subject"), "run_key": "{{ dag.dag_id }}/{{ run_id }}", "run_name": "{{ run_id }}",
            "tags": [*DATASET_TAGS, "base_model={{ ti.xcom_pull(task_ids='models')['base_model'] }}",
                     "instance_prompt={{ params.instance_prompt }}", "class_prompt={{ params.class_prompt }}"],
        })
        validated = StepOperator(task_id="validate", step="validate", options={
            "input": f"{RUN}/dataset/images", "output": f"{RUN}/validated", "screen": DEPLOYMENT.screen,
            "screen_policy": subject.screen_policy,
        })
        captioned = StepOperator(task_id="caption", step="caption", options={
            "report": f"{RUN}/validated", "output": f"{RUN}/captions", "instance_prompt": param("instance_prompt"),
            "strategy": param("caption_strategy"), "caption_model": pinned("caption_model"),
        })
        resized = StepOperator(task_id="resize", step="resize", options={
            "captions": f"{RUN}/captions", "output": f"{RUN}/resized", "resolution": param("resolution"),
            "crop": param("crop"), "no_upscale": param("no_upscale"), "seed": param("seed"),
        })

        @task
        def encode_shards(prepared: dict) -> list[dict]:
            """One `encode` options dict per shard of at most `encode_shard_size` images (one pod each)."""
            return plan.encode_shard_options(*_params_and_run_dir(), images=prepared["images"])

        encoded_shards = partial_step(
            task_id="encode", step="encode", profile="gpu", map_index_template="shard {{ task.options['shard_index'] }}",
        ).expand(options=encode_shards(resized.output))

        @task
        def cache_to_merge(shards: list[dict]) -> dict:
            """`merge-cache` options: every shard must have computed the same content key."""
            caches = {s["cache"] for s in shards}
            if len(caches) != 1:
                raise ValueError(f"encode shards disagree on the cache: {sorted(caches)}")
            return {"cache": caches.pop(), "num_shards": len(shards)}

        encoded = StepOperator(task_id="merge_cache", step="merge-cache", options=cache_to_merge(encoded_shards.output))

        @task.short_circuit(ignore_downstream_trigger_rules=False)
        def prior_preservation_on() -> bool:
            return _params_and_run_dir()[0]["prior_preservation"]

        class_images = StepOperator(task_id="class_images", step="class-images", profile="gpu", options={
            "base_model": pinned("base_model"), "class_prompt": param("class_prompt"),
            "output": DEPLOYMENT.cache_dir("class-images"), "count": param("num_class_images"),
            "resolution": param("resolution"), "seed": param("seed"), "dtype": param("inference_dtype"),
            "vae": pinned("vae"),
        })
        class_cache = StepOperator(task_id="encode_class_images", step="encode", profile="gpu", options={
            "images": "{{ ti.xcom_pull(task_ids='class_images')['images'] }}", "output": DEPLOYMENT.cache_dir("encode"),
            "base_model": pinned("base_model"),
        })

        @task(trigger_rule="none_failed")  # runs whether prior preservation was on or skipped
        def training_runs(data: dict, cache: dict) -> list[dict]:
            """One `train` options dict per learning rate."""
            ti = get_current_context()["ti"]
            # Pulled rather than passed: a task right after the setup task mlflow_run must keep all_success.
            parent = ti.xcom_pull(task_ids="mlflow_run")
            prior = ti.xcom_pull(task_ids="encode_class_images")  # None when prior preservation was skipped
            return plan.training_options(*_params_and_run_dir(), dataset=data, cache=cache["cache"],
                                         parent_run_id=parent["run_id"], class_cache=prior and prior["cache"])

        sweep = training_runs(dataset.output, encoded.output)
        trained = partial_step(task_id="train", step="train", profile="gpu", map_index_template=TRAINED,
                               ).expand(options=sweep)

        @task(trigger_rule="all_done_min_one_success")  # a learning rate that diverged must not sink the sweep
        def checkpoint_evaluations(training_results: list[dict]) -> list[dict]:
            """`evaluate` options, one per GPU slot, sharing out every checkpoint of each training run that
            finished, the current champion and the base model (dreamline.plan.evaluation_options)."""
            params, run = _params_and_run_dir()
            current = get_current_context()["ti"].xcom_pull(task_ids="champion")  # it ran before training
            finished = {r["learning_rate"] for r in training_results}  # a failed train task leaves no result
            if not finished:
                raise AirflowFailException("no learning rate finished training: see the train tasks' logs")
            if failed := [lr for lr in params["learning_rates"] if lr not in finished]:
                print(f"not evaluated, their training failed: {', '.join(f'lr={lr:g}' for lr in failed)}")
            return plan.evaluation_options(params, run, training_results, current)

        evaluations = checkpoint_evaluations(trained.output)
        evaluated = partial_step(
            task_id="evaluate", step="evaluate", profile="gpu", map_index_template=EVALUATED,
        ).expand(options=evaluations)
        stages = [(trained, evaluated)]  # successive halving's rungs, each skipped when the sweep has no such rung
        for number in range(1, MAX_RUNGS + 1):
            stages.append(halving_rung(number, *stages[-1]))

        # From the evaluations that succeeded (a failed one is named, not fatal), whichever rungs ran.
        selected = StepOperator(task_id="select", step="select", trigger_rule="all_done", options={
            "evaluations": f"{RUN}/eval", "output": f"{RUN}/select", "sweep": f"{RUN}/sweep",
            "expected": evaluation_folders("checkpoint_evaluations"),
            "weight_accuracy": param("weight_accuracy"), "weight_flexibility": param("weight_flexibility"),
            "weight_preservation": param("weight_preservation"), "parent_run_id": PARENT_RUN_ID,
        })

        @task
        def confirmations(selection: dict) -> dict:
            """`evaluate` options for the selected checkpoint, the champion and the base model on prompts and
            seeds selection did not use, in one process (dreamline.plan.confirmation_options)."""
            params, run = _params_and_run_dir()
            ti = get_current_context()["ti"]
            return plan.confirmation_options(params, run, selection["selected"], ti.xcom_pull(task_ids="champion"),
                                             ti.xcom_pull(task_ids="dataset")["hash"])

        confirmed = StepOperator(task_id="confirm", step="evaluate", profile="gpu",
                                 options=confirmations(selected.output))
        registered = StepOperator(task_id="register", step="register", on_success_callback=on_promotion, options={
            "selection": f"{RUN}/select", "dataset": f"{RUN}/dataset", "output": f"{RUN}/register",
            "model_name": subject.model_name, "parent_run_id": PARENT_RUN_ID,
            "recipe_hash": "{{ ti.xcom_pull(task_ids='recipe')['recipe_hash'] }}", "confirmation": f"{RUN}/confirm",
            "confidence": param("promotion_confidence"), "margin": param("promotion_margin"),
            "require_approval": param("require_approval"), "review_url": DEPLOYMENT.mlflow_ui_url,
            "cost": f"{RUN}/cost", "gpu_hour_price": DEPLOYMENT.gpu_hour_price, "models": f"{RUN}/models",
            "instance": "{{ params.instance_token }} {{ params.class_noun }}",  # what the image server fills in
        })

        @task.short_circuit(ignore_downstream_trigger_rules=False)
        def approval_needed(registration: dict) -> bool:
            """True only when the version earned promotion and the form asks for a reviewer: otherwise nothing
            waits (approval and promote are skipped; register has promoted it, or it was not eligible)."""
            return registration["awaiting_approval"]

        approval = RunBoundApproval(
            task_id="approval", subject=f"Promote {subject.model_name} v{{{{ {REGISTERED}['version'] }}}} to champion?",
            body=f"{{{{ {REGISTERED}['review'] }}}}", defaults="Reject",  # no answer in time: the champion stays
            response_timeout=timedelta(hours=subject.approval_timeout_hours),
        )
        promoted = StepOperator(task_id="promote", step="promote", on_success_callback=on_promotion, options={
            "model_name": subject.model_name, "version": f"{{{{ {REGISTERED}['version'] }}}}",
            "by": "{{ (ti.xcom_pull(task_ids='approval')['responded_by_user'] or {}).get('name', 'a reviewer') }}",
            "reason": f"{{{{ {REGISTERED}['decision'] }}}}",
            "compared_with": f"{{{{ {REGISTERED}['compared_with'] or 0 }}}}",  # refused if champion moved meanwhile
        })

        # Runs whatever happened upstream; a run that failed before `register` closed it ends FAILED, not RUNNING.
        closed = StepOperator(task_id="close_mlflow_run", step="end-run", options={"run_id": PARENT_RUN_ID})

        checked = recipe()
        chain(checked, [dataset, champion, models])
        chain(models, lineage)  # lineage compares the pinned base model
        go = anything_to_train(lineage.output)
        chain(dataset, lineage, go, mlflow_run, validated, captioned, resized)
        chain(champion, go)  # a registry that cannot be reached fails the run before any GPU is used
        chain(go, prior_preservation_on(), class_images, class_cache, sweep)
        chain(champion, evaluations)  # checkpoint_evaluations pulls the champion's result
        chain([evaluated for _, evaluated in stages], selected)
        chain(confirmed, registered, approval_needed(registered.output), approval, promoted,
              closed.as_teardown(setups=mlflow_run))

    return lora()


# an evaluate task's map index: what it evaluates, e.g. "lr-0.0001, base"
EVALUATED = "{% for t in task.options['targets'] %}{{ t.split('=')[0] }}{{ ', ' if not loop.last }}{% endfor %}"
TRAINED = "lr={{ task.options['learning_rate'] }}"


def halving_rung(number: int, trained, evaluated) -> tuple:
    """Rung `number` of successive halving: rank the learning rates that reached it (`halve`), train the kept ones
    on from their rung checkpoint, and evaluate their new checkpoints. Every task of it is skipped when the sweep
    has no such rung (a grid, or fewer rungs)."""
    with TaskGroup(f"rung_{number}", tooltip=f"Successive halving, rung {number}"):
        @task(trigger_rule="all_done_min_one_success")  # a rate that diverged before the rung is not fatal
        def halving(training_results: list[dict]) -> list[dict]:
            """[] (skipping the rest of the rung) or the `halve` options of the learning rates that reached it."""
            return plan.halving_options(*_params_and_run_dir(), rung=number, training_results=training_results)

        ranking = halving(trained.output)
        chain(evaluated, ranking)
        halved = partial_step(task_id="halve", step="halve", map_index_template="step {{ task.options['rung'] }}",
                              ).expand(options=ranking)

        @task
        def kept_training_runs(decisions: list[dict]) -> list[dict]:
            """`train` options of the learning rates kept: the first stage's, to the next stop."""
            context = get_current_context()
            first_stage = context["ti"].xcom_pull(task_ids="training_runs")
            return plan.continued_training(context["params"], number, first_stage, decisions[0]["kept"])

        trained_on = partial_step(task_id="train", step="train", profile="gpu", map_index_template=TRAINED,
                                  ).expand(options=kept_training_runs(halved.output))

        @task(trigger_rule="all_done_min_one_success")
        def new_checkpoint_evaluations(training_results: list[dict]) -> list[dict]:
            """The kept training runs' `evaluate` tasks: their checkpoints already evaluated are not redone."""
            return plan.evaluation_options(*_params_and_run_dir(), training_results, None, base=False)

        evaluated_on = partial_step(task_id="evaluate", step="evaluate", profile="gpu", map_index_template=EVALUATED,
                                    ).expand(options=new_checkpoint_evaluations(trained_on.output))
    return trained_on, evaluated_on


def _params_and_run_dir() -> tuple[dict, str]:
    """The run's form values, each model setting as the `models` task pinned it (`id@sha`), and its folder."""
    context = get_current_context()
    params = plan.with_pinned_models(context["params"], context["ti"].xcom_pull(task_ids="models"))
    return params, DEPLOYMENT.run_dir(context["dag"].dag_id, context["run_id"])


for _subject in subjects.load():
    lora_dag(_subject)
