"""
### Batch images: a prompt list x seeds, rendered with a subject's champion, for a campaign or a review

Pick the subject, write the prompts (`{instance}` becomes the words the version was trained with, e.g. `sks dog`)
and the seeds. A run:

1. **lora**: fetches the version the alias names (`champion` by default) once, so every image of the batch is made
   by the same version even if a promotion happens meanwhile; a subject with no such version fails here, in one
   line;
2. **render**: one task per prompt, mapped, in the `gpu` pool (each loads the base model and the LoRA once and
   renders the prompt at every seed), into this run's folder: a PNG per seed and an `images.json` that says how to
   make each image again;
3. **grid**: one MLflow run in the experiment `<subject>-batches` with the grid (a row per prompt, a column per
   seed), every
   image and the settings, tagged with the model and version.

The images come from the image server's own renderer: a served image with the same version, prompt, seed and
settings is the same image.
"""
from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from dreamline import subjects
from dreamline.deployment import DEPLOYMENT
from dreamline.operators import StepOperator, param, partial_step

try:
    SUBJECTS = {s.name: s for s in subjects.load()}
except subjects.SubjectRegistryError:  # said once, by the subjects' own DAG file; no batch without subjects
    SUBJECTS = {}
RUN = "{{ run_dir(dag.dag_id, run_id) }}"


@dag(
    dag_id="batch_images",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    doc_md=__doc__,
    user_defined_macros={"run_dir": DEPLOYMENT.run_dir},
    params={
        "subject": Param(next(iter(SUBJECTS), ""), type="string", enum=list(SUBJECTS) or [""], title="Subject",
                         description="Whose model renders the batch (the subject registry's names).",
                         section="What to render"),
        "prompts": Param(["a photo of {instance} on a beach", "a watercolor painting of {instance}"], type="array",
                         items={"type": "string", "minLength": 1, "maxLength": 2000}, minItems=1, maxItems=64,
                         title="Prompts", description="One per line; {instance} becomes the subject's words "
                         "(e.g. sks dog). One GPU task per prompt.", section="What to render"),
        "seeds": Param([0, 1, 2, 3], type="array", items={"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                       minItems=1, maxItems=16, uniqueItems=True, title="Seeds",
                       description="One image per prompt and seed; the same seed makes the same image again.",
                       section="What to render"),
        "alias": Param("champion", type="string", enum=["champion", "challenger"], title="Version",
                       description="The registry alias whose version renders: the champion, or the latest "
                       "challenger to review it before promotion.", section="What to render"),
        "negative_prompt": Param("", type="string", maxLength=2000, title="Negative prompt", section="Settings"),
        "steps": Param(25, type="integer", minimum=1, maximum=200, title="Denoising steps", section="Settings"),
        "guidance": Param(5.0, type="number", minimum=0, maximum=30, title="Guidance scale", section="Settings"),
        "size": Param(0, type="integer", minimum=0, maximum=2048, multipleOf=8, title="Size (pixels)",
                      description="Width and height; 0: the base model's native size (1024 for SDXL).",
                      section="Settings"),
    },
    tags=["dreamline", "sdxl", "batch"],
)
def batch_images():
    @task
    def model_name() -> str:
        """The subject's registered model."""
        return SUBJECTS[get_current_context()["params"]["subject"]].model_name

    lora = StepOperator(task_id="lora", step="champion", options={
        "model_name": "{{ ti.xcom_pull(task_ids='model_name') }}", "alias": param("alias"), "output": f"{RUN}/lora",
    })

    @task
    def prompts_to_render(fetched: dict) -> list[dict]:
        """One `generate` options dict per prompt, {instance} filled in with the version's own words."""
        context = get_current_context()
        params, subject = context["params"], SUBJECTS[context["params"]["subject"]]
        if fetched["checkpoint"] is None:
            raise AirflowFailException(f"{subject.model_name}: no {params['alias']!r} version to render with")
        instance = fetched.get("instance") or f"{subject.token} {subject.class_noun}"
        run_dir = DEPLOYMENT.run_dir(context["dag"].dag_id, context["run_id"])
        return [{"lora": fetched["checkpoint"], "prompt": prompt.replace("{instance}", instance),
                 "seeds": params["seeds"], "negative_prompt": params["negative_prompt"], "steps": params["steps"],
                 "guidance": params["guidance"], "size": params["size"], "prompt_index": index,
                 "screen": DEPLOYMENT.screen, "output": f"{run_dir}/images/prompt-{index}"}
                for index, prompt in enumerate(params["prompts"])]

    rendered = partial_step(task_id="render", step="generate", profile="gpu",
                            map_index_template="prompt {{ task.options['prompt_index'] }}",
                            ).expand(options=prompts_to_render(lora.output))
    grid = StepOperator(task_id="grid", step="batch-report", options={
        "images": f"{RUN}/images", "experiment": "{{ params.subject }}-batches", "run_name": "batch {{ run_id }}",
        "tags": ["dag_run={{ run_id }}", "alias={{ params.alias }}"],
    })
    model_name() >> lora
    rendered >> grid


if SUBJECTS:
    batch_images()
