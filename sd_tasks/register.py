"""Register the selected LoRA as a new version of the subject's model in the MLflow Model Registry.

The version is logged with MLflow's diffusers flavor (the LoRA plus a reference to its base model, so
`mlflow.pyfunc.load_model("models:/<name>@champion")` rebuilds the pipeline), tagged with its lineage: dataset rev,
commit and content hash, base model, learning rate, step and scores. `champion` is set when the model has none.
Registering the same pipeline run twice returns the version made the first time.
"""
from __future__ import annotations

from dataclasses import dataclass

from sd_tasks import tracking
from sd_tasks.cli import option
from sd_tasks.select import format_table
from sd_tasks.storage import read_dir, read_json, write_dir, write_json
from sd_tasks.train import CHECKPOINT_INFO

CHAMPION = "champion"


@dataclass
class RegisterConfig:
    """Log the selected checkpoint as a registered model version with its lineage."""

    selection: str = option("select's output (URI of the folder holding selection.json)")
    dataset: str = option("dataset's output (URI of the folder holding dataset.json)")
    model_name: str = option("registered model name")
    output: str = option("URI to write registration.json to")
    parent_run_id: str | None = option("MLflow parent run of the pipeline run; closed as FINISHED", None)
    experiment: str = option("MLflow experiment for a standalone registration", "dreamline")


def run(config: RegisterConfig) -> dict:
    selection = read_json(f"{config.selection}/selection.json")
    dataset = read_json(f"{config.dataset}/dataset.json")
    best = selection["selected"]
    info = read_json(f"{best['checkpoint']}/{CHECKPOINT_INFO}")
    client = tracking.client()
    run_key = config.parent_run_id or best["checkpoint"]
    tags = {
        "dreamline.run_key": run_key,
        "dataset.repo": dataset["repo"], "dataset.path": dataset["path"], "dataset.rev": dataset["rev"],
        "dataset.commit": dataset["commit"], "dataset.hash": dataset["hash"],
        "base_model": info["base_model"], "learning_rate": f"{best['learning_rate']:g}", "step": str(best["step"]),
        "training_run_id": best["run_id"],
        **{f"score.{k}": f"{best[k]:.6f}" for k in ("score", "dino", "clip_i", "clip_t")},
    }
    version = existing_version(client, config.model_name, run_key)
    if version is None:
        version = log_version(config, best, info, tags)
    aliases = client.get_registered_model(config.model_name).aliases
    if CHAMPION not in aliases:
        client.set_registered_model_alias(config.model_name, CHAMPION, version)
        aliases = client.get_registered_model(config.model_name).aliases
    if config.parent_run_id:
        client.log_dict(config.parent_run_id, selection, "selection.json")
        client.log_text(config.parent_run_id, format_table(selection), "selection.txt")
        client.set_terminated(config.parent_run_id, "FINISHED")
    result = {"model_name": config.model_name, "version": int(version),
              "aliases": sorted(a for a, v in aliases.items() if str(v) == str(version)),
              "learning_rate": best["learning_rate"], "step": best["step"], "score": best["score"]}
    with write_dir(config.output) as out:
        write_json(out / "registration.json", result)
    return result


def existing_version(client, name: str, run_key: str) -> str | None:
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`dreamline.run_key` = '{run_key}'")
    except Exception:  # the registered model does not exist yet
        return None
    return found[0].version if found else None


def log_version(config: RegisterConfig, best: dict, info: dict, tags: dict) -> str:
    import mlflow

    checkpoint = read_dir(best["checkpoint"])
    run_id = config.parent_run_id or tracking.find_or_create_run(config.experiment, tags["dreamline.run_key"],
                                                                 "register")
    with mlflow.start_run(run_id=run_id):  # leaving it marks the parent run FINISHED: registering is the last step
        model = mlflow.diffusers.log_model(
            str(checkpoint / "pytorch_lora_weights.safetensors"), base_model=info["base_model"],
            adapter_type="lora", name="lora", registered_model_name=config.model_name,
            pip_requirements=_requirements(),  # skip MLflow's slow requirement inference
        )
    version = str(model.registered_model_version)
    client = tracking.client()
    for key, value in tags.items():
        client.set_model_version_tag(config.model_name, version, key, value)
    client.update_model_version(config.model_name, version, description=model_card(config.model_name, tags))
    return version


def model_card(name: str, tags: dict) -> str:
    return (
        f"SDXL DreamBooth-LoRA `{name}`.\n\n"
        f"- Base model: `{tags['base_model']}`\n"
        f"- Dataset: `{tags['dataset.path']}` at `{tags['dataset.rev']}` (commit {tags['dataset.commit'][:12]}, "
        f"{tags['dataset.hash']}) from `{tags['dataset.repo']}`\n"
        f"- Learning rate {tags['learning_rate']}, step {tags['step']} (training run {tags['training_run_id']})\n"
        f"- Scores: overall {tags['score.score']}, DINO {tags['score.dino']}, CLIP-I {tags['score.clip_i']}, "
        f"CLIP-T {tags['score.clip_t']}\n\n"
        f"Load: `mlflow.pyfunc.load_model('models:/{name}@champion')`."
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "diffusers", "transformers", "peft", "accelerate", "torch")]
