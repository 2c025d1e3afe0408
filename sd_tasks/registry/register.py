"""Register the selected LoRA in the MLflow Model Registry, and promote it only when it is better.

The version is logged with MLflow's diffusers flavor (the LoRA plus a reference to its base model, so
`mlflow.pyfunc.load_model("models:/<name>@champion")` rebuilds the pipeline), tagged with its lineage (dataset rev,
commit and hash, code version, base model, learning rate, step) and every score, and described by a model card.
It always gets the alias `challenger`. `champion` moves to it only on evidence, judged on the confirmation suite:
the selected checkpoint, the champion and the base model evaluated again on prompts and seeds that were not used to
select it (so picking the best of many noisy evaluations, and a checkpoint's luck with particular prompts, do not
decide), compared image by image with the prompts resampled as clusters (sd_tasks.evaluation.compare):
- with a champion, the challenger's normalised weighted score minus the champion's must have its whole bootstrap
  confidence interval above the margin;
- with none (the first version), its subject fidelity must beat the base model's the same way: a LoRA that learned
  nothing stays `challenger`, with the reason.
A champion that cannot be compared is kept: a nightly run never replaces a better model with a worse one. With
`--require-approval`, an eligible version is not promoted here: the DAG asks a reviewer, and `promote` moves it.
Registering the same pipeline run twice returns the version made the first time.

`champion` (step `champion`) fetches the current champion's LoRA as a checkpoint folder that `evaluate` can score.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from unittest import mock

from sd_tasks.core import tracking
from sd_tasks.core.config import option
from sd_tasks.core.cost import ledger, summarise
from sd_tasks.core.redact import redact
from sd_tasks.core.storage import read_dir, read_json, whole_jsons, write_dir, write_json
from sd_tasks.evaluation.compare import MIN_PROMPTS, Yardstick, describe, paired_difference
from sd_tasks.models import model_refs
from sd_tasks.registry.promotion import CHAMPION, move_champion
from sd_tasks.registry.report import report, review
from sd_tasks.training import lora_files
from sd_tasks.training.checkpoint_files import CHECKPOINT_INFO, LORA_WEIGHTS

CHALLENGER = "challenger"  # and CHAMPION, from sd_tasks.registry.promotion: every move of that alias goes through it
SCORES = ("score", "dino", "clip_i", "clip_t", "preservation")
# What a version was trained from (sd_tasks.registry.lineage compares a new run's with it): version tag -> what it names
LINEAGE = {"lineage.dataset_hash": "dataset content", "lineage.recipe_hash": "recipe",
           "lineage.base_model": "base model", "lineage.code_version": "code version"}


@dataclass
class RegisterConfig:
    """Log the selected checkpoint as a registered model version with its lineage; promote it if it is better."""

    selection: str = option("select's output (URI of the folder holding selection.json)")
    dataset: str = option("dataset's output (URI of the folder holding dataset.json)")
    model_name: str = option("registered model name")
    output: str = option("URI to write registration.json to")
    parent_run_id: str | None = option("MLflow parent run of the pipeline run; closed as FINISHED", None)
    experiment: str = option("MLflow experiment for a standalone registration", "dreamline")
    recipe_hash: str = option("fingerprint of the recipe the pipeline ran (its lineage; see sd_tasks.registry.lineage)", "")
    confirmation: str | None = option("folder whose sub-folders hold the confirmation evaluations (URI): the selected "
                                      "checkpoint, the champion and the base model on prompts and seeds not used to select", None)
    confidence: float = option("confidence level of the paired bootstrap interval", 0.95, at_least=0.5, at_most=0.999)
    margin: float = option("normalised score difference the whole interval must exceed to promote", 0.1,
                           at_least=-10, at_most=10)
    max_flagged: float = option("share of a checkpoint's evaluation images (selection's and confirmation's) the "
                                "screen may flag and it still be promoted", 0.0, at_least=0, at_most=1)
    require_approval: bool = option("an eligible version waits for a reviewer (the DAG's approval task, then "
                                    "`promote`) instead of being promoted here", False)
    review_url: str | None = option("MLflow URL a reviewer's browser can load artifacts from (images in the review)",
                                    None)
    cost: str | None = option("folder of the night's cost records (sd_tasks.core.cost): totalled onto the parent run and "
                              "the version", None)
    gpu_hour_price: float = option("price of one GPU-hour, for the estimated price of the night", 2.5, at_least=0)
    models: str | None = option("pin-models' output (URI of the folder holding models.json): every model the run "
                                "used, tagged `model.<setting>` as it was pinned (id@sha)", None)
    instance: str = option("the subject's words as the LoRA was trained on them (`sks dog`), tagged `instance`: "
                           "the image server fills {instance} with them", "")


def run(config: RegisterConfig) -> dict:
    selection = read_json(f"{config.selection}/selection.json")
    dataset = read_json(f"{config.dataset}/dataset.json")
    best = selection["selected"]
    info = read_json(f"{best['checkpoint']}/{CHECKPOINT_INFO}")
    lora_files.check_checkpoints([best["checkpoint"]])  # its header: this step stays without torch
    client = tracking.client()
    run_key = config.parent_run_id or best["checkpoint"]
    tags = {
        "dreamline.run_key": run_key,
        "dataset.repo": redact(dataset["repo"]),  # dataset.json of older runs may hold a token
        "dataset.path": dataset["path"], "dataset.rev": dataset["rev"],
        "dataset.commit": dataset["commit"], "dataset.hash": dataset["hash"], "code_version": code_version(),
        "base_model": info["base_model"], "learning_rate": f"{best['learning_rate']:g}", "step": str(best["step"]),
        "training_run_id": str(best["run_id"]), "eval.suite": str(best.get("suite")),
        **{f"score.{k}": f"{best[k]:.6f}" for k in SCORES if best.get(k) is not None},
        "score.broken": "true" if best.get("broken") else "false",  # `rollback` and `promote` refuse such a version
        "score.flagged": str(best.get("flagged") or 0),  # images the screen flagged (sd_tasks.safety.screening)
        **lineage_tags(dataset["hash"], config.recipe_hash, info["base_model"]),
        **model_tags(config.models),
        **({"instance": config.instance} if config.instance else {}),
        **(dataset.get("consent") or {}),  # consent.id, .expires, .scope: the server serves it only while covered
    }
    found = existing_version(client, config.model_name, run_key)
    version = complete_version(client, found, tags) if found else log_version(config, best, info, tags)
    confirmation = confirmation_evaluations(config.confirmation)
    current = client.get_registered_model(config.model_name).aliases.get(CHAMPION)
    eligible, reason, comparison, needs_review = decide(current, version, best, confirmation, selection["weights"],
                                                        config.confidence, config.margin, config.max_flagged)
    awaiting = eligible and (config.require_approval or needs_review) and str(current) != str(version)
    decision = reason
    if awaiting:
        reason += "; waiting for a reviewer's approval"
    client.set_registered_model_alias(config.model_name, CHALLENGER, version)
    if eligible and not awaiting:  # already the champion: move_champion records nothing
        move_champion(client, config.model_name, version, by="dreamline", reason=reason, action="promoted")
    aliases = client.get_registered_model(config.model_name).aliases
    spent = summarise(ledger(config.cost), config.gpu_hour_price) if config.cost else None
    if spent:  # what the night cost up to this version (set again by a retry: the same ledger, a larger one)
        for key, value in {"seconds": f"{spent['total']['seconds']:.1f}", "gpu_hour_price": f"{config.gpu_hour_price:g}",
                           "gpu_seconds": f"{spent['total']['gpu_seconds']:.1f}",
                           "estimated_price": f"{spent['total']['price']:.2f}"}.items():
            client.set_model_version_tag(config.model_name, str(version), f"cost.{key}", value)
    result = {"model_name": config.model_name, "version": int(version), "promoted": eligible and not awaiting,
              "awaiting_approval": awaiting, "reason": reason, "decision": decision, "comparison": comparison,
              "aliases": sorted(a for a, v in aliases.items() if str(v) == str(version)),
              "champion": int(aliases[CHAMPION]) if CHAMPION in aliases else None,
              "compared_with": int(current) if current is not None else None,  # `promote` checks it still is
              "learning_rate": best["learning_rate"], "step": best["step"], "score": best["score"], "cost": spent}
    if config.parent_run_id:
        client.log_dict(config.parent_run_id, selection, "selection.json")
        client.log_text(config.parent_run_id, report(config.model_name, selection, result), "report.md")
        if comparison:
            for key in ("difference", "low", "high"):
                client.log_metric(config.parent_run_id, f"promotion/{key}", comparison[key])
        if spent:
            for key, value in spent["total"].items():
                client.log_metric(config.parent_run_id, f"cost/{key}", value)
        if selection.get("halving"):
            for key in ("saved_seconds", "saved_gpu_seconds"):
                client.log_metric(config.parent_run_id, f"halving/{key}", sum(r[key] for r in selection["halving"]))
        client.set_terminated(config.parent_run_id, "FINISHED")
    result["review"] = review(config.model_name, selection, result, config.parent_run_id,  # the approval page
                              config.review_url)
    with write_dir(config.output) as out:
        write_json(out / "registration.json", result)
    return result


def confirmation_evaluations(uri: str | None) -> list[dict]:
    """The whole evaluations under the confirmation folder (none without one): their metrics.json, not images."""
    return list(whole_jsons(uri, "metrics.json").values()) if uri else []


class Decision(NamedTuple):
    eligible: bool  # may become champion
    reason: str
    comparison: dict | None  # the paired comparison that decided, if one did
    needs_review: bool = False  # eligible only with a reviewer's approval, whatever the form says


def decide(current: str | None, version: str, best: dict, confirmation: list[dict], weights: dict,
           confidence: float, margin: float, max_flagged: float = 0.0) -> Decision:
    """Whether `version` may become champion, why, and the paired comparison that decided it; `current` is the
    champion's version (None without one), `confirmation` the confirmation suite's evaluations."""
    if best.get("broken"):
        return Decision(False, "its images were not finite (a diverged LoRA)", None)
    if flagged := too_flagged(best, max_flagged):
        return Decision(False, f"the screen flagged {flagged} of its evaluation images (more than {max_flagged:.0%}); "
                               f"not promoted", None)
    if str(current) == str(version):
        return Decision(True, "already the champion", None)
    challenger = next((e for e in confirmation if e.get("checkpoint") == best["checkpoint"]), None)
    base = next((e for e in confirmation if e.get("base")), None)
    if challenger is None or base is None:
        missing = "the selected checkpoint" if challenger is None else "the base model"
        return Decision(False, f"{missing} was not evaluated on the confirmation suite; not promoted", None)
    if challenger.get("broken"):
        return Decision(False, "its images on the confirmation seeds were not finite (a diverged LoRA)", None)
    if flagged := too_flagged(challenger, max_flagged):
        return Decision(False, f"the screen flagged {flagged} of its confirmation images (more than "
                               f"{max_flagged:.0%}); not promoted", None)
    yardstick = Yardstick.from_base(base)
    if len(challenger.get("per_image", {}).get("dino") or []) < MIN_PROMPTS:
        return Decision(False, f"the confirmation suite has fewer than {MIN_PROMPTS} prompts: no interval can be "
                               f"drawn; not promoted", None)
    if current is None:
        comparison = paired_difference(challenger, base, yardstick, {"accuracy": 1.0}, confidence)
        verdict = f"subject fidelity against the base model {describe(comparison)}"
        if comparison["low"] > margin:
            return Decision(True, f"first version: {verdict}, above the margin {margin:g}", comparison)
        return Decision(False, f"first version: {verdict} does not lie above the margin {margin:g}", comparison)
    champion = next((e for e in confirmation if str(e.get("champion_version")) == str(current)), None)
    if champion is None:
        return Decision(False, f"champion v{current} was not evaluated on the confirmation suite (not compared); "
                               f"kept", None)
    comparison = paired_difference(challenger, champion, yardstick, weights, confidence)
    verdict = f"score against champion v{current} {describe(comparison)}"
    if comparison["low"] <= margin:
        return Decision(False, f"{verdict} does not lie above the margin {margin:g}; v{current} kept", comparison)
    served, here = champion.get("trained_on"), challenger.get("trained_on")
    if served and here and served != here:  # the champion was scored on a pairing that is never served
        return Decision(True, f"{verdict}, above the margin {margin:g}; but champion v{current} is served on "
                              f"{served} and was scored here on {here}: a reviewer decides", comparison, True)
    return Decision(True, f"{verdict}, above the margin {margin:g}", comparison)


def too_flagged(evaluation: dict, max_flagged: float) -> str | None:
    """"N of M" when the screen flagged more than `max_flagged` of an evaluation's images; None otherwise."""
    flagged, screened = evaluation.get("flagged") or 0, evaluation.get("screened") or 0
    return f"{flagged} of {screened}" if screened and flagged / screened > max_flagged else None


def existing_version(client, name: str, run_key: str):
    """The version this pipeline run registered before (a retry), or None. Only "not found" means none: any other
    error (an MLflow outage) fails the step, which is retried, rather than registering the run twice."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`dreamline.run_key` = '{run_key}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # the registered model does not exist yet
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def complete_version(client, found, tags: dict) -> str:
    """A version an earlier try created but was stopped before finishing: its missing tags and card."""
    version = str(found.version)
    for key, value in tags.items():
        if key not in found.tags:
            client.set_model_version_tag(found.name, version, key, value)
    if not found.description:
        client.update_model_version(found.name, version, description=model_card(found.name, {**tags, **found.tags}))
    return version


def log_version(config: RegisterConfig, best: dict, info: dict, tags: dict) -> str:
    import mlflow

    checkpoint = read_dir(best["checkpoint"])
    run_id = config.parent_run_id or tracking.find_or_create_run(config.experiment, tags["dreamline.run_key"],
                                                                 "register")
    with mlflow.start_run(run_id=run_id), flavor_base_model(info["base_model"]) as base_model:
        # (leaving the run marks the parent run FINISHED: registering is the last step)
        model = mlflow.diffusers.log_model(
            str(checkpoint / LORA_WEIGHTS), base_model=base_model, adapter_type="lora", name="lora",
            pip_requirements=_requirements(),  # skip MLflow's slow requirement inference
        )
    # The tags, the run key among them, are on the version from its creation: a try stopped right after it leaves
    # a version its retry finds (and completes) instead of registering another.
    version = str(mlflow.register_model(model.model_uri, config.model_name, tags=tags).version)
    tracking.client().update_model_version(config.model_name, version,
                                           description=model_card(config.model_name, tags))
    return version


def model_card(name: str, tags: dict) -> str:
    scores = ", ".join(f"{k} {tags[f'score.{k}']}" for k in SCORES if f"score.{k}" in tags)
    return (
        f"SDXL DreamBooth-LoRA `{name}`.\n\n"
        f"- Base model: `{tags['base_model']}`\n"
        + "".join(f"- {role.removeprefix('model.')}: `{ref}`\n" for role, ref in sorted(tags.items())
                  if role.startswith("model.") and role != "model.base_model")
        + f"- Dataset: `{tags['dataset.path']}` at `{tags['dataset.rev']}` (commit {tags['dataset.commit'][:12]}, "
        f"{tags['dataset.hash']}) from `{tags['dataset.repo']}`\n"
        f"- Learning rate {tags['learning_rate']}, step {tags['step']} (training run {tags['training_run_id']}), "
        f"code {tags['code_version']}\n"
        f"- Scores (evaluation suite {tags['eval.suite']}): {scores}\n\n"
        f"Load: `mlflow.pyfunc.load_model('models:/{name}@champion')`; the LoRA file also loads with diffusers' "
        f"`load_lora_weights`."
    )


def lineage_tags(dataset_hash: str, recipe_hash: str, base_model: str) -> dict[str, str]:
    return {"lineage.dataset_hash": dataset_hash, "lineage.recipe_hash": recipe_hash,
            "lineage.base_model": base_model, "lineage.code_version": code_version()}


def model_tags(models: str | None) -> dict[str, str]:
    """`model.<setting>`: every model the run used, as `pin-models` pinned it (none without its output)."""
    if not models:
        return {}
    return {f"model.{role}": entry["pinned"] for role, entry in read_json(f"{models}/models.json").items()}


@contextlib.contextmanager
def flavor_base_model(base_model: str):
    """The base model as MLflow's diffusers flavor records it: the hub id, with our pinned commit as its
    `base_model_revision`, so `models:/...` loads the weights that were trained on. The flavor would otherwise look up
    the commit `main` points to at registration time (a hub that moved since training, or cannot be reached, would
    record another commit or none); a local folder is recorded as it is."""
    import mlflow.diffusers

    model = model_refs.parse(base_model, "base model")
    if model.folder is not None or not model.pinned:
        yield base_model
        return
    with mock.patch.object(mlflow.diffusers, "_resolve_base_model_revision", lambda _: model.revision):
        yield model.repo_id


def code_version() -> str:
    """The git commit of the code that ran, `<sha>-dirty.<hash of the changes>` when tracked files differ from it
    (an edited trainer is a changed code version), or DREAMLINE_CODE_VERSION in images built without .git."""
    if os.environ.get("DREAMLINE_CODE_VERSION"):
        return os.environ["DREAMLINE_CODE_VERSION"]
    here = Path(__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True,
                              text=True).stdout.strip() or here)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary", "--no-ext-diff"], cwd=top, capture_output=True).stdout
    new = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=top,
                         capture_output=True).stdout.split(b"\0")
    changes = hashlib.sha256(diff)
    for name in sorted(filter(None, new)):  # files not yet added are changes too
        path = top / os.fsdecode(name)
        changes.update(name + b"\0" + (path.read_bytes() if path.is_file() and not path.is_symlink() else b""))
    if not diff and not any(new):
        return head.stdout.strip()
    return f"{head.stdout.strip()}-dirty.{changes.hexdigest()[:12]}"


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "diffusers", "transformers", "peft", "accelerate", "torch")]


@dataclass
class ChampionConfig:
    """Fetch the current champion's LoRA as a checkpoint folder, so `evaluate` can score it on today's suite (or
    render a batch with it)."""

    model_name: str = option("registered model name")
    output: str = option("URI to write the checkpoint folder to")
    alias: str = option("the alias whose version is fetched", CHAMPION)


def champion(config: ChampionConfig) -> dict:
    import mlflow

    current = tracking.version_by_alias(tracking.client(), config.model_name, config.alias)
    if current is None:  # no such model or no champion yet (and only then: an outage fails the step)
        return {"checkpoint": None, "version": None}
    with write_dir(config.output) as out, tempfile.TemporaryDirectory() as tmp:  # the download is not kept
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{config.model_name}/{current.version}",
                                                              dst_path=tmp))
        weights = next(downloaded.rglob("*.safetensors"))
        lora_files.check(weights, f"models:/{config.model_name}/{current.version} ({weights.name})")
        (out / LORA_WEIGHTS).write_bytes(weights.read_bytes())
        write_json(out / CHECKPOINT_INFO, {"step": int(current.tags.get("step", 0)),
                                           "learning_rate": float(current.tags.get("learning_rate", 0)),
                                           "base_model": current.tags["base_model"],
                                           "champion_version": int(current.version), "run_id": None,
                                           "model_name": config.model_name, "alias": config.alias,
                                           "instance": current.tags.get("instance"),
                                           "consent": {k: v for k, v in current.tags.items()
                                                       if k.startswith("consent.")}})
    return {"checkpoint": config.output, "version": int(current.version), "instance": current.tags.get("instance")}
