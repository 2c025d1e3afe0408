"""
### SDXL DreamBooth-LoRA: from a versioned folder of photos to a registered, evaluated LoRA

Every night at 02:00 (or on **Trigger** with the form below) this DAG:

1. **dataset**: fetches the subject's images at the chosen version of the DVC data registry (rev, commit and
   content hash are recorded on every MLflow run and on the registered version);
2. opens an MLflow parent run for the DAG run;
3. **validate → caption → resize → encode**: checks every image, captions it, fits it to an SDXL bucket, and
   caches VAE latents and both text encoders' embeddings, in shards of *encode shard size* images (one pod each),
   content-addressed so an unchanged dataset is not encoded again;
4. **train**: one DreamBooth-LoRA run per learning rate, in parallel, a checkpoint every *checkpoint interval*;
   with *prior preservation*, also on class images the base model generates once (cached). A preempted GPU pod is
   retried and resumes from its latest checkpoint; a learning rate that diverges fails its own task only;
5. **evaluate**: every checkpoint of the learning rates that finished, and the current champion, on the same prompts
   and seeds (DINO, CLIP-I, CLIP-T, preservation of the base model's class images);
6. **select** the best checkpoint by the weighted score (the parent run gets image grids and metric plots),
   **register** it in the MLflow Model Registry as a new version of `<subject>-sdxl-lora` with alias
   `challenger`, and move `champion` to it only if it beats the current champion;
7. closes the MLflow parent run (FAILED if the DAG run failed before registering).

Each task runs one `python -m sd_tasks <step>` command: a local process here, a Kubernetes pod on a GPU node in
production (`DREAMLINE_EXECUTOR=kubernetes`). Everything a run writes lives under one folder per DAG run; only small
JSON results travel through XCom. Review the sweep in MLflow: experiment `<subject>`, one nested run per learning
rate.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import chain, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from dreamline import plan
from dreamline.deployment import DEPLOYMENT
from dreamline.operators import StepOperator
from dreamline.params import evaluation_params, subject_params, training_params

RUN = "{{ run_dir(dag.dag_id, run_id) }}"  # this DAG run's folder
PARENT_RUN_ID = "{{ ti.xcom_pull(task_ids='mlflow_run')['run_id'] }}"
# The dataset's lineage, recorded on every MLflow run of the DAG run.
DATASET_TAGS = [
    "dataset.rev={{ ti.xcom_pull(task_ids='dataset')['rev'] }}",
    "dataset.commit={{ ti.xcom_pull(task_ids='dataset')['commit'] }}",
    "dataset.hash={{ ti.xcom_pull(task_ids='dataset')['hash'] }}",
]
# GPU pods get preempted. Their steps are safe to run again: train resumes from its latest checkpoint, encode and
# class images are content-addressed, evaluate rewrites its folder. A step that refuses its input fails at once.
RETRIED = {"retries": 2, "retry_delay": timedelta(minutes=1)}


@dag(
    dag_id="sdxl_dreambooth_lora",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    params={**subject_params(), **training_params(), **evaluation_params()},
    user_defined_macros={"run_dir": DEPLOYMENT.run_dir},
    render_template_as_native_obj=True,  # "{{ params.flip }}" renders as a bool, not the string "False"
    tags=["dreamline", "sdxl", "lora"],
)
def sdxl_dreambooth_lora():
    dataset = StepOperator(task_id="dataset", step="dataset", options={
        "repo": "{{ params.dataset_repo }}", "rev": "{{ params.dataset_version }}", "path": "{{ params.subject }}",
        "output": f"{RUN}/dataset",
    })
    mlflow_run = StepOperator(task_id="mlflow_run", step="start-run", options={
        "experiment": "{{ params.subject }}", "run_key": "{{ dag.dag_id }}/{{ run_id }}", "run_name": "{{ run_id }}",
        "tags": [*DATASET_TAGS, "base_model={{ params.base_model }}", "instance_prompt={{ params.instance_prompt }}",
                 "class_prompt={{ params.class_prompt }}"],
    })
    validated = StepOperator(task_id="validate", step="validate", options={
        "input": f"{RUN}/dataset/images", "output": f"{RUN}/validated",
    })
    captioned = StepOperator(task_id="caption", step="caption", options={
        "report": f"{RUN}/validated", "output": f"{RUN}/captions", "instance_prompt": "{{ params.instance_prompt }}",
        "strategy": "{{ params.caption_strategy }}", "caption_model": "{{ params.caption_model }}",
    })
    resized = StepOperator(task_id="resize", step="resize", options={
        "captions": f"{RUN}/captions", "output": f"{RUN}/resized", "resolution": "{{ params.resolution }}",
        "crop": "{{ params.crop }}", "no_upscale": "{{ params.no_upscale }}", "seed": "{{ params.seed }}",
    })

    @task
    def encode_shards(prepared: dict) -> list[dict]:
        """One `encode` options dict per shard of at most `encode_shard_size` images (one pod each)."""
        return plan.encode_shard_options(*_params_and_run_dir(), images=prepared["images"])

    encoded_shards = StepOperator.partial(
        task_id="encode", step="encode", profile="gpu", map_index_template="shard {{ task.options['shard_index'] }}",
        **RETRIED,
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

    class_images = StepOperator(task_id="class_images", step="class-images", profile="gpu", **RETRIED, options={
        "base_model": "{{ params.base_model }}", "class_prompt": "{{ params.class_prompt }}",
        "output": DEPLOYMENT.cache_dir("class-images"), "count": "{{ params.num_class_images }}",
        "resolution": "{{ params.resolution }}", "seed": "{{ params.seed }}", "dtype": "{{ params.inference_dtype }}",
        "vae": "{{ params.vae or None }}",
    })
    class_cache = StepOperator(task_id="encode_class_images", step="encode", profile="gpu", **RETRIED, options={
        "images": "{{ ti.xcom_pull(task_ids='class_images')['images'] }}", "output": DEPLOYMENT.cache_dir("encode"),
        "base_model": "{{ params.base_model }}",
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
    trained = StepOperator.partial(
        task_id="train", step="train", profile="gpu", map_index_template="lr={{ task.options['learning_rate'] }}",
        **RETRIED,
    ).expand(options=sweep)

    champion = StepOperator(task_id="champion", step="champion", options={
        "model_name": "{{ params.subject }}-sdxl-lora", "output": f"{RUN}/champion",
    })

    @task(trigger_rule="all_done_min_one_success")  # a learning rate that diverged must not sink the sweep
    def checkpoint_evaluations(training_results: list[dict]) -> list[dict]:
        """One `evaluate` options dict per checkpoint of every training run that finished, and one for the current
        champion (dreamline.plan.evaluation_options)."""
        params, run = _params_and_run_dir()
        current = get_current_context()["ti"].xcom_pull(task_ids="champion")  # pulled: this task runs when it failed
        if current is None:
            raise AirflowFailException("the champion step failed, so there is nothing to compare with: see its log")
        finished = {r["learning_rate"] for r in training_results}  # a failed train task leaves no result
        if not finished:
            raise AirflowFailException("no learning rate finished training: see the train tasks' logs")
        if failed := [lr for lr in params["learning_rates"] if lr not in finished]:
            print(f"not evaluated, their training failed: {', '.join(f'lr={lr:g}' for lr in failed)}")
        return plan.evaluation_options(params, run, training_results, current)

    evaluations = checkpoint_evaluations(trained.output)
    evaluated = StepOperator.partial(
        task_id="evaluate", step="evaluate", profile="gpu",
        map_index_template="{{ task.options['output'].split('/eval/')[-1] }}", **RETRIED,
    ).expand(options=evaluations)

    selected = StepOperator(task_id="select", step="select", options={
        "evaluations": f"{RUN}/eval", "output": f"{RUN}/select",
        "weight_accuracy": "{{ params.weight_accuracy }}", "weight_flexibility": "{{ params.weight_flexibility }}",
        "weight_preservation": "{{ params.weight_preservation }}", "parent_run_id": PARENT_RUN_ID,
    })
    registered = StepOperator(task_id="register", step="register", options={
        "selection": f"{RUN}/select", "dataset": f"{RUN}/dataset", "output": f"{RUN}/register",
        "model_name": "{{ params.subject }}-sdxl-lora", "parent_run_id": PARENT_RUN_ID,
    })

    # Runs whatever happened upstream; a run that failed before `register` closed it ends FAILED, not RUNNING.
    closed = StepOperator(task_id="close_mlflow_run", step="end-run", options={"run_id": PARENT_RUN_ID})

    chain(dataset, mlflow_run, validated, captioned, resized)
    chain(prior_preservation_on(), class_images, class_cache, sweep)
    chain(champion, evaluations)  # checkpoint_evaluations pulls the champion's result
    chain(evaluated, selected, registered, closed.as_teardown(setups=mlflow_run))


def _params_and_run_dir() -> tuple[dict, str]:
    context = get_current_context()
    return context["params"], DEPLOYMENT.run_dir(context["dag"].dag_id, context["run_id"])


sdxl_dreambooth_lora()
