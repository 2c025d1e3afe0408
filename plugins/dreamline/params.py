"""The trigger form of Dreamline's DAGs: typed Params with titles, descriptions, sections and the JSON-schema rules
that refuse bad input in the form.

Defaults are the production recipe (SDXL base, 500 steps, a checkpoint every 100, three learning rates), then the
subject's entry in the subject registry (dreamline.subjects) over it; the deployment's environment supplies the
model and registry defaults (dreamline.deployment). What JSON schema cannot say (max steps a multiple of the
checkpoint interval, the number of evaluations) is checked by the DAG's first task (dreamline.plan.check_recipe).
"""
from __future__ import annotations

import copy

from airflow.sdk import Param

from dreamline.deployment import DEPLOYMENT
from dreamline.subjects import Subject, SubjectRegistryError

# DreamBench's prompt templates (Ruiz et al. 2023); {instance} becomes "<token> <class>", e.g. "sks dog".
_COMMON = ["a {instance} in the jungle", "a {instance} in the snow", "a {instance} on the beach",
           "a {instance} on a cobblestone street", "a {instance} on top of pink fabric",
           "a {instance} on top of a wooden floor", "a {instance} with a city in the background",
           "a {instance} with a mountain in the background", "a {instance} with a blue house in the background",
           "a {instance} on top of a purple rug in a forest"]
_STYLES = ["a red {instance}", "a purple {instance}", "a shiny {instance}", "a wet {instance}",
           "a cube shaped {instance}"]
DREAMBENCH_PROMPTS = {
    "object": _COMMON + [
        "a {instance} with a wheat field in the background",
        "a {instance} with a tree and autumn leaves in the background",
        "a {instance} with the Eiffel Tower in the background", "a {instance} floating on top of water",
        "a {instance} floating in an ocean of milk", "a {instance} on top of green grass with sunflowers around it",
        "a {instance} on top of a mirror", "a {instance} on top of the sidewalk in a crowded street",
        "a {instance} on top of a dirt road", "a {instance} on top of a white rug"] + _STYLES,
    "live": _COMMON + [
        "a {instance} wearing a red hat", "a {instance} wearing a santa hat", "a {instance} wearing a rainbow scarf",
        "a {instance} wearing a black top hat and a monocle", "a {instance} in a chef outfit",
        "a {instance} in a firefighter outfit", "a {instance} in a police outfit", "a {instance} wearing pink glasses",
        "a {instance} wearing a yellow shirt", "a {instance} in a purple wizard outfit"] + _STYLES,
}
DREAMBENCH_PROMPTS["person"] = DREAMBENCH_PROMPTS["live"]  # a person is a live subject that needs consent


# An evaluation prompt: contains {instance}, and no other {field} than {instance} and {class_noun}.
PROMPT_TEMPLATE = r"^(?=.*\{instance\})(?:[^{}]|\{instance\}|\{class_noun\})*$"


def evaluation_prompts(params: dict, suite: str = "selection", subject: bool = True) -> list[str]:
    """The run's evaluation prompts of one suite, filled in. The templates are the form's list, or DreamBench's 25
    for the subject kind: those at even positions choose the checkpoint (`selection`), the others confirm it
    (`confirmation`), so the promotion is judged on prompts selection never saw. `subject` False renders the class
    noun in place of `{instance}` ("a dog in the jungle"): preservation's class prompts on the confirmation suite."""
    templates = params["evaluation_prompts"] or DREAMBENCH_PROMPTS[params["subject_kind"]]
    templates = templates[{"selection": 0, "confirmation": 1}[suite]::2]
    instance = f"{params['instance_token']} {params['class_noun']}" if subject else params["class_noun"]
    return [t.format(instance=instance, class_noun=params["class_noun"]) for t in templates]


MIN_EVALUATION_PROMPTS = 4  # half choose the checkpoint, half confirm it; an interval needs two prompts or more


def judging_params() -> frozenset[str]:
    """The settings of how checkpoints are judged and promoted (the Evaluation and Promotion sections): they change
    no trained weight."""
    return frozenset({*evaluation_params(), *promotion_params(Subject("any", "thing"))})


def integer_params() -> frozenset[str]:
    """The Params whose JSON type is integer, alone or as array items: JSON schema takes 500.0 for one, where the
    step's argparse refuses `--max-steps=500.0`, after the run has started."""
    subject = Subject("any", "thing")
    form = {**run_params(), **subject_params(subject), **training_params(), **evaluation_params(),
            **promotion_params(subject)}
    return frozenset(name for name, p in form.items()
                     if "integer" in (p.schema.get("type"), p.schema.get("items", {}).get("type")))


RUN = "This run"
MAX_LEARNING_RATES = 8
MAX_CHECKPOINTS = 20  # per training run; each is evaluated
MAX_RUNGS = 2  # successive halving's rungs: the DAG has this many stages after the first, skipped when not used
SUBJECT = "Subject and data"
PREPARATION = "Data preparation"
TRAINING = "Training"
EVALUATION = "Evaluation and selection"
PROMOTION = "Promotion"


def dag_params(subject: Subject) -> dict[str, Param]:
    """The trigger form of a subject's DAG: the production recipe with the subject's registry entry over it."""
    params = {**run_params(), **subject_params(subject), **training_params(), **evaluation_params(subject.kind),
              **promotion_params(subject)}
    fixed = {"subject", "instance_token", "class_noun", "subject_kind"}  # said by the entry's own fields
    for name, value in subject.recipe.items():
        if name not in params or name in fixed:
            raise SubjectRegistryError(f"subject {subject.name!r}: recipe.{name} is not a setting of the trigger form"
                                       f"{' (set it on the subject)' if name in fixed else ''}")
        param = copy.deepcopy(params[name])
        try:
            param.resolve(value)  # the registry's value must pass the form's own rules
        except Exception as exc:
            raise SubjectRegistryError(f"subject {subject.name!r}: recipe.{name}={value!r}: "
                                       f"{str(exc).splitlines()[0]}") from None
        param.value = value
        params[name] = param
    return params


def run_params() -> dict[str, Param]:
    return {
        "force": Param(False, type="boolean", title="Train even if nothing changed",
                       description="A run first compares what it would train (dataset content, recipe, base model, "
                       "code version) with what the current champion and challenger were trained from, and ends "
                       "skipped when nothing changed. Tick to train anyway.", section=RUN),
    }


def subject_params(subject: Subject) -> dict[str, Param]:
    return {
        "subject": Param(subject.name, type="string", enum=[subject.name], title="Subject",
                         description="This DAG's subject, from the subject registry: it names the MLflow experiment "
                         "and the registered model.", section=SUBJECT),
        "instance_token": Param(subject.token, type="string", pattern=r"^[^\s{}]+$", title="Instance token",
                                description="Rare token that comes to mean your subject.", section=SUBJECT),
        "class_noun": Param(subject.class_noun, type="string", minLength=1, title="Class noun",
                            description="What the subject is, e.g. dog, backpack, person.", section=SUBJECT),
        "instance_prompt": Param(f"a photo of {subject.token} {subject.class_noun}", type="string", minLength=1,
                                 title="Instance prompt", description="Caption of every training image.",
                                 section=SUBJECT),
        "class_prompt": Param(f"a photo of {subject.class_noun}", type="string", minLength=1, title="Class prompt",
                              description="Prompt for the class images of prior preservation.", section=SUBJECT),
        "dataset_repo": Param(subject.dataset_repo or DEPLOYMENT.dataset_repo, type="string", minLength=1,
                              title="Data registry", description="Git URL or path of the DVC data registry.",
                              section=SUBJECT),
        "dataset_path": Param(subject.dataset_path or subject.name, type="string", pattern=r"^[^/\s][^\s]*$",
                              title="Dataset folder", description="The subject's folder in the data registry.",
                              section=SUBJECT),
        "dataset_version": Param(subject.dataset_version, type="string", pattern=r"^[^\s]+$",
                                 title="Dataset version", description="Git tag, branch or commit of the data "
                                 "registry to train on; a branch (main) trains on the newest published version.",
                                 section=SUBJECT),
        "caption_strategy": Param("instance", type="string", enum=["instance", "sidecar", "model"],
                                  values_display={"instance": "Instance prompt for every image",
                                                  "sidecar": "Sidecar .txt/.caption files (kohya)",
                                                  "model": "Captioning model (BLIP)"},
                                  title="Captions", description="Where each image's caption comes from; found "
                                  "captions are appended to the instance prompt.", section=PREPARATION),
        "caption_model": Param(DEPLOYMENT.caption_model, type="string", minLength=1, title="Captioning model",
                               description="Used when captions come from a model.", section=PREPARATION),
        "crop": Param("center", type="string", enum=["center", "random"], title="Crop",
                      description="Where images are cropped to their bucket.", section=PREPARATION),
        "no_upscale": Param(False, type="boolean", title="Never upscale",
                            description="Small photos go to smaller buckets instead of being enlarged.",
                            section=PREPARATION),
        "flip": Param(False, type="boolean", title="Flip augmentation",
                      description="Also train on mirrored copies (not for asymmetric subjects such as text).",
                      section=PREPARATION),
        "encode_shard_size": Param(1000, type="integer", minimum=1, maximum=100_000, title="Encode shard size",
                                   description="Images per encode task; larger sets are encoded in parallel shards.",
                                   section=PREPARATION),
    }


def training_params() -> dict[str, Param]:
    return {
        "base_model": Param(DEPLOYMENT.base_model, type="string", minLength=1, title="Base model",
                            description="SDXL pipeline: Hugging Face id or a local diffusers folder.", section=TRAINING),
        "learning_rates": Param([1e-4, 5e-4, 1e-5], type="array",
                                items={"type": "number", "exclusiveMinimum": 0},
                                minItems=1, maxItems=MAX_LEARNING_RATES, uniqueItems=True, title="Learning rates",
                                description="One training run per value, run in parallel; each value once, "
                                "above 0.", section=TRAINING),
        "max_steps": Param(500, type="integer", minimum=1, maximum=100_000, title="Max steps",
                           description="Optimizer steps of each training run; a multiple of the checkpoint "
                           "interval.", section=TRAINING),
        "checkpointing_steps": Param(100, type="integer", minimum=1, title="Checkpoint interval",
                                     description=f"Steps between checkpoints; every checkpoint is evaluated, so at "
                                     f"most {MAX_CHECKPOINTS} per training run.", section=TRAINING),
        "sweep_strategy": Param("grid", type="string", enum=["grid", "halving"],
                                values_display={"grid": "Grid: every learning rate trains to max steps",
                                                "halving": "Successive halving: the losing rates stop at each rung"},
                                title="Sweep strategy", description="Halving evaluates every learning rate at each "
                                "rung and only the best fraction trains on (resuming, so no step is repeated): "
                                "fewer GPU-hours for the same winner when the losers show early.", section=TRAINING),
        "halving_rungs": Param([100, 300], type="array", items={"type": "integer", "minimum": 1, "maximum": 100_000},
                               minItems=1, maxItems=MAX_RUNGS, uniqueItems=True, title="Halving rungs",
                               description=f"Steps at which learning rates are compared (at most {MAX_RUNGS}, "
                               "ascending, multiples of the checkpoint interval, below max steps).", section=TRAINING),
        "halving_keep": Param(0.5, type="number", exclusiveMinimum=0, maximum=1, title="Halving: fraction kept",
                              description="Fraction of the learning rates that train on at each rung (rounded up, "
                              "at least one): 0.5 takes 3 rates to 2, then 1.", section=TRAINING),
        "rank": Param(4, type="integer", minimum=1, maximum=256, title="LoRA rank",
                      description="Rank of the LoRA matrices: capacity (and file size) of what is learned.",
                      section=TRAINING),
        "train_text_encoder": Param(False, type="boolean", title="Train the text encoders",
                                    description="LoRA on both text encoders too, at the same learning rate: the "
                                    "prompt's encoding learns the subject as well (often better for faces), for "
                                    "more GPU time and memory per step, as the captions are encoded every step.",
                                    section=TRAINING),
        "resolution": Param(1024, type="integer", minimum=64, maximum=2048, multipleOf=64, title="Resolution",
                            description="Training and evaluation image side, in pixels: a multiple of 64 (SDXL's "
                            "buckets), 1024 for SDXL.", section=TRAINING),
        "mixed_precision": Param("auto", type="string", enum=["auto", "bf16", "fp16", "no"],
                                 values_display={"auto": "auto: bf16 on a CUDA GPU, fp32 on the CPU",
                                                 "bf16": "bf16", "fp16": "fp16 (with loss scaling)",
                                                 "no": "fp32"},
                                 title="Mixed precision", description="Frozen weights in half precision, LoRA "
                                 "weights and optimizer in fp32.", section=TRAINING),
        "gradient_checkpointing": Param(True, type="boolean", title="Gradient checkpointing",
                                        description="Recompute the UNet's activations in the backward pass: far "
                                        "less GPU memory at 1024 px for some more time per step.",
                                        section=TRAINING),
        "prior_preservation": Param(False, type="boolean", title="Prior preservation",
                                    description="Train on class images generated by the base model too, so the "
                                    "class keeps its variety (DreamBooth's prior-preservation loss).",
                                    section=TRAINING),
        "num_class_images": Param(100, type="integer", minimum=1, maximum=10_000, title="Class images",
                                  description="How many class images to generate (once; they are cached).",
                                  section=TRAINING),
        "prior_loss_weight": Param(1.0, type="number", minimum=0, title="Prior loss weight",
                                   description="Weight of the class images' loss beside the subject's.",
                                   section=TRAINING),
        "seed": Param(0, type="integer", minimum=0, maximum=2**31 - 1, title="Seed",
                      description="Seeds training noise and order, and the evaluation images.", section=TRAINING),
    }


def evaluation_params(kind: str = "live") -> dict[str, Param]:
    return {
        "subject_kind": Param(kind, type="string", enum=["object", "live", "person"],
                              values_display={"object": "Object (backpack, toy, ...)", "live": "Live subject (pet, ...)",
                                              "person": "Person (trained only under a consent record)"},
                              title="Subject kind", description="Picks DreamBench's prompt set.", section=EVALUATION),
        "evaluation_prompts": Param([], type="array", items={"type": "string", "pattern": PROMPT_TEMPLATE},
                                    maxItems=100, title="Evaluation prompts",
                                    description="Empty: DreamBench's 25 prompts for the subject kind; otherwise at "
                                    f"least {MIN_EVALUATION_PROMPTS}. The 1st, 3rd, 5th... choose the checkpoint, the "
                                    "others confirm it (prompts selection never saw decide the promotion). Each prompt "
                                    "contains `{instance}`, which becomes '<token> <class>'; `{class_noun}` becomes "
                                    "the class; no other braces.", section=EVALUATION),
        # Screening: every checkpoint on a small, cheap suite; the full protocol is spent on the confirmation.
        "screening_prompts": Param(6, type="integer", minimum=1, maximum=50, title="Screening prompts",
                                   description="Every checkpoint, the champion and the base model are screened on "
                                   "this many of the selection prompts (spread over them); the winner is then confirmed "
                                   "on the held-out prompts with the full protocol (Promotion).", section=EVALUATION),
        "images_per_prompt": Param(2, type="integer", minimum=1, maximum=64, title="Screening images per prompt",
                                   description="Fixed-seed images per screening prompt and checkpoint.",
                                   section=EVALUATION),
        "inference_steps": Param(12, type="integer", minimum=1, maximum=200, title="Screening steps",
                                 description="Denoising steps of each screening image (with the screening "
                                 "scheduler).", section=EVALUATION),
        "screening_scheduler": Param("DPMSolverMultistepScheduler", type="string",
                                     pattern=r"^([A-Za-z0-9]+Scheduler)?$", title="Screening scheduler",
                                     description="A diffusers scheduler that needs few steps (DPM-Solver++); empty: "
                                     "the base model's own.", section=EVALUATION),
        "inference_dtype": Param("auto", type="string", enum=["auto", "float16", "bfloat16", "float32"],
                                 values_display={"auto": "auto: float16 on a CUDA GPU, float32 on the CPU",
                                                 "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"},
                                 title="Inference precision", description="Of the pipelines that generate evaluation "
                                 "and class images. In float16, SDXL's own VAE upcasts itself to float32 to decode.",
                                 section=EVALUATION),
        # Optional, so null: the trigger form takes an empty text field for a missing value, and refuses it where the
        # type does not admit null.
        "vae": Param(None, type=["null", "string"], title="VAE",
                     description="Decode with this VAE instead of the base model's (Hugging Face id or folder), e.g. "
                     "madebyollin/sdxl-vae-fp16-fix, which stays in float16. Empty: the base model's.",
                     section=EVALUATION),
        "clip_model": Param(DEPLOYMENT.clip_model, type="string", minLength=1, title="CLIP model",
                            description="Scores CLIP-I (subject) and CLIP-T (prompt): Hugging Face id or folder.",
                            section=EVALUATION),
        "dino_model": Param(DEPLOYMENT.dino_model, type="string", minLength=1, title="DINO model",
                            description="Scores DINO subject fidelity: Hugging Face id or folder.",
                            section=EVALUATION),
        "weight_accuracy": Param(1.0, type="number", minimum=0, title="Weight: subject fidelity",
                                 description="How much DINO and CLIP-I count in the score.", section=EVALUATION),
        "weight_flexibility": Param(1.0, type="number", minimum=0, title="Weight: prompt fidelity",
                                    description="How much CLIP-T counts in the score.", section=EVALUATION),
        "weight_preservation": Param(0.5, type="number", minimum=0, title="Weight: preservation",
                                     description="How much keeping the base model's class images counts.",
                                     section=EVALUATION),
    }


def promotion_params(subject: Subject) -> dict[str, Param]:
    return {
        "confirmation_images_per_prompt": Param(4, type="integer", minimum=1, maximum=64,
                                                title="Confirmation images per prompt",
                                                description="The selected checkpoint, the champion and the base "
                                                "model are scored again on this many images per held-out prompt, on "
                                                "seeds not used for selection: the promotion is decided on these.",
                                                section=PROMOTION),
        "confirmation_inference_steps": Param(25, type="integer", minimum=1, maximum=200,
                                              title="Confirmation steps", description="Denoising steps of each "
                                              "confirmation image, with the base model's own scheduler.",
                                              section=PROMOTION),
        "promotion_confidence": Param(0.95, type="number", minimum=0.5, maximum=0.999, title="Confidence level",
                                      description="Of the bootstrap interval of the score difference, challenger "
                                      "minus champion, paired image by image.", section=PROMOTION),
        "promotion_margin": Param(0.1, type="number", minimum=-10, maximum=10, title="Margin",
                                  description="The whole interval must lie above this to promote. Scores are "
                                  "normalised against the base model: 0.1 is a tenth of its per-image spread. With no "
                                  "champion yet, the first version's subject fidelity must beat the base model's by "
                                  "it.", section=PROMOTION),
        "require_approval": Param(subject.require_approval, type="boolean", title="Require a reviewer's approval",
                                  description="A version that earns promotion waits for Approve or Reject in "
                                  "Airflow (Required actions), shown its report and grids; no answer within "
                                  f"{subject.approval_timeout_hours:g} h keeps the champion. Off: nothing waits.",
                                  section=PROMOTION),
    }
