"""`make subject NAME=rex PHOTOS=~/photos/rex TOKEN=sks CLASS=dog [KIND=live] [SCHEDULE="0 3 * * *"]`: your own
subject, from a folder of photos to a DAG that trains it (KIND=person needs CONSENT=FILE, the person's consent
record, published with the photos: sd_tasks/data/consent.py).

1. checks the photos as every run will (`sd_tasks validate`: decodable, large enough, not duplicates), without
   touching them;
2. publishes them as the next version `<NAME>-v<N>` of the embedded data registry (DREAMLINE_DATASET_REPO, by
   default DREAMLINE_HOME/data-registry with its DVC remote DREAMLINE_HOME/dvc-remote): a copy, the folder stays yours;
3. adds the subject to the subject registry (DREAMLINE_SUBJECTS, by default dags/subjects.yaml) on the dataset's
   main version, nightly at SCHEDULE ("none": manual runs only) and whenever a new version is published; a subject
   already listed keeps its entry, and its next run trains on the new version.

Then `make ui` (with DREAMLINE_MODELS=hub on a GPU machine) shows DAG `lora_<NAME>`: trigger it, or unpause it for
its night. Every refusal is one line, `error: make subject: ...`, exit 1.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from dreamline import subjects  # noqa: E402  (plain Python and YAML: no Airflow import)
from sd_tasks.core.errors import StepError  # noqa: E402
from sd_tasks.data.dataset import PublishConfig, publish  # noqa: E402
from sd_tasks.data.validate import ValidateConfig, run as validate  # noqa: E402

USAGE = ("make subject NAME=rex PHOTOS=~/photos/rex TOKEN=sks CLASS=dog [KIND=live|object|person CONSENT=FILE] "
         "[SCHEDULE='0 3 * * *']")


def main(environ=os.environ) -> int:
    try:
        print(add_subject(environ))
        return 0
    except (ValueError, StepError) as exc:
        print(f"error: make subject: {exc}", file=sys.stderr)
        return 1


def add_subject(environ) -> str:
    name, photos, token, noun = (environ.get(k, "").strip() for k in ("NAME", "PHOTOS", "TOKEN", "CLASS"))
    if not (name and photos and noun):
        raise ValueError(f"NAME, PHOTOS and CLASS are required: {USAGE}")
    if not subjects.NAME.match(name):
        raise ValueError(f"NAME={name!r}: lower-case letters, digits, '-' and '_' (it names the DAG lora_{name})")
    source = Path(photos).expanduser().resolve()
    schedule = environ.get("SCHEDULE", "0 2 * * *").strip()
    entry = {"token": token or "sks", "class_noun": noun, "kind": environ.get("KIND", "object").strip(),
             "dataset": {"path": name, "version": "main"},
             "schedule": None if schedule.lower() in ("", "none", "null") else schedule, "on_new_data": True}
    home = Path(environ["DREAMLINE_HOME"]).resolve()
    registry = Path(environ.get("DREAMLINE_DATASET_REPO") or home / "data-registry")
    if not registry.is_absolute():
        raise ValueError(f"DREAMLINE_DATASET_REPO={registry}: `make subject` publishes into a local registry; for a "
                         f"remote one, publish from a clone with `python -m sd_tasks publish-dataset`")
    listing = Path(environ.get("DREAMLINE_SUBJECTS") or subjects.DEFAULT_REGISTRY)
    if str(listing).startswith("variable:"):
        raise ValueError(f"DREAMLINE_SUBJECTS={listing}: an Airflow Variable; add the subject in the UI "
                         f"(Admin > Variables) and publish with `python -m sd_tasks publish-dataset`")
    subjects._subject(str(listing), name, entry)  # the rules the DAGs apply, before anything is written
    consent = environ.get("CONSENT", "").strip() or None
    if entry["kind"] == "person" and not consent:
        raise ValueError(f"KIND=person: CONSENT=FILE is required, the person's consent record (docs/safety.md); "
                         f"a person's photos are never published or trained without one")
    with tempfile.TemporaryDirectory() as scratch:  # the photos checked as a run checks them, not changed
        checked = validate(ValidateConfig(input=str(source), output=f"{scratch}/validated"))
    version = next_version(registry, name)
    published = publish(PublishConfig(source=str(source), repo=str(registry), path=name, tag=version,
                                      remote=str(home / "dvc-remote"), consent=consent))
    added = subjects.add(listing, name, entry)
    wanted = next(s for s in subjects.load(str(listing)) if s.name == name).dataset_version
    trains = f"its next run trains on {version}" if wanted == "main" else \
        f"its entry asks for dataset version {wanted!r}: set it to main (or {version}) to train on the new photos"
    return (f"{checked['accepted']} photos accepted, {checked['rejected']} rejected (each run's validate report says "
            f"why); published as {name}@{version} (commit {published['commit'][:12]}) in {registry}.\n"
            f"Subject {name!r} {'added to' if added else 'already in'} {listing}: DAG lora_{name}, registered model "
            f"{name}-sdxl-lora; {trains}.")


def next_version(registry: Path, name: str) -> str:
    """`<name>-v<N>`, one above the highest published."""
    import subprocess

    tags = subprocess.run(["git", "tag", "--list", f"{name}-v*"], cwd=registry, capture_output=True,
                          text=True).stdout.split() if (registry / ".git").exists() else []
    numbers = [int(t.rsplit("-v", 1)[1]) for t in tags if t.rsplit("-v", 1)[1].isdigit()]
    return f"{name}-v{max(numbers, default=0) + 1}"


if __name__ == "__main__":
    sys.exit(main())
