"""The subject registry: which subjects Dreamline trains, on which data, when, and with which recipe.

One DAG per subject (`lora_<name>`), so every subject has its own DAG runs, run folders, MLflow experiment
(`<name>`), registered model (`<name>-sdxl-lora`) and aliases. The registry is a YAML file, `dags/subjects.yaml`
by default, or an Airflow Variable; `DREAMLINE_SUBJECTS` chooses:

| DREAMLINE_SUBJECTS | registry |
| --- | --- |
| (unset) | `dags/subjects.yaml`, deployed with the DAGs (reviewed like code) |
| a path | that YAML file |
| `variable:NAME` | the Airflow Variable NAME, holding the same YAML (or JSON); edited in the UI, no deploy |

Each entry (only `class_noun` is required):

    dog:
      token: sks                 # rare token that comes to mean the subject
      class_noun: dog
      kind: live                 # live (pets), person (live, and trained only under a consent record) or
                                 # object: picks DreamBench's evaluation prompts
      dataset: {repo: ..., path: dog, version: main}   # repo: the deployment's registry; path: the name
      schedule: "0 2 * * *"      # cron, or null for manual runs only
      on_new_data: true          # also run when a new dataset version is published (an Asset event)
      timeout_hours: 20          # a run still going after this fails, so it cannot block later nights
      require_approval: false    # a version that earns promotion waits for a reviewer's Approve in Airflow
      approval_timeout_hours: 12 # no answer by then: rejected, the champion kept (less than timeout_hours)
      recipe: {max_steps: 800}   # overrides of the trigger form's defaults (dreamline.params)
      screen_policy: quarantine  # a training photo the screen flags: quarantine (left out, with the reason in
                                 # validate's report) or refuse (the run fails in one line); docs/safety.md

A registry that cannot be read, or an entry that is wrong, fails DAG parsing with one line naming the registry,
the subject and the reason.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_ENV = "DREAMLINE_SUBJECTS"
DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "dags" / "subjects.yaml"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
KINDS = ("live", "object", "person")  # person: live prompts, and trained only with consent
FIELDS = {"token", "class_noun", "kind", "dataset", "schedule", "on_new_data", "timeout_hours", "recipe",
          "require_approval", "approval_timeout_hours", "screen_policy"}
SCREEN_POLICIES = ("quarantine", "refuse")  # sd_tasks.data.validate's --screen-policy
DATASET_FIELDS = {"repo", "path", "version"}


class SubjectRegistryError(ValueError):
    """The registry or one of its entries is wrong; the message is one line naming where."""


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    token: str = "sks"
    kind: str = "object"
    dataset_repo: str | None = None  # None: the deployment's data registry
    dataset_path: str = ""  # "": the subject's name
    dataset_version: str = "main"
    schedule: str | None = "0 2 * * *"
    on_new_data: bool = False
    timeout_hours: float = 20.0
    require_approval: bool = False
    approval_timeout_hours: float = 12.0
    recipe: dict = field(default_factory=dict)
    screen_policy: str = "quarantine"

    @property
    def dag_id(self) -> str:
        return f"lora_{self.name}"

    @property
    def model_name(self) -> str:
        return f"{self.name}-sdxl-lora"

    def dataset_asset(self):
        """The Asset whose events mean "a new version of this subject's dataset was published"."""
        from airflow.sdk import Asset

        return Asset(uri=f"dreamline://datasets/{self.name}", name=f"{self.name}-dataset", group="dreamline")


def load(source: str | None = None) -> list[Subject]:
    """The registry's subjects, from DREAMLINE_SUBJECTS (or `source`), in the order written."""
    source = source or os.environ.get(REGISTRY_ENV) or str(DEFAULT_REGISTRY)
    text = _read(source)
    try:
        import yaml

        data = yaml.safe_load(text)
    except Exception as exc:
        raise SubjectRegistryError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("subjects"), dict) or not data["subjects"]:
        raise SubjectRegistryError(f"{source}: expected a mapping `subjects:` of at least one subject")
    return [_subject(source, str(name), entry) for name, entry in data["subjects"].items()]


def _read(source: str) -> str:
    if source.startswith("variable:"):
        from airflow.sdk import Variable

        try:
            value = Variable.get(source.removeprefix("variable:"))
        except Exception as exc:  # KeyError or the SDK's not-found error
            raise SubjectRegistryError(f"{source}: the Airflow Variable cannot be read ({type(exc).__name__})") \
                from None
        return value if isinstance(value, str) else json.dumps(value)
    try:
        return Path(source).read_text()
    except OSError as exc:
        raise SubjectRegistryError(f"{source}: cannot read the subject registry ({exc.strerror})") from None


def _subject(source: str, name: str, entry) -> Subject:
    where = f"{source}: subject {name!r}"
    if not NAME.match(name):
        raise SubjectRegistryError(f"{where}: names are lower-case letters, digits, '-' and '_' (at most 64)")
    if not isinstance(entry, dict):
        raise SubjectRegistryError(f"{where}: expected a mapping of settings")
    if unknown := sorted(set(entry) - FIELDS):
        raise SubjectRegistryError(f"{where}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    dataset = entry.get("dataset") or {}
    if not isinstance(dataset, dict) or (unknown := sorted(set(dataset) - DATASET_FIELDS)):
        raise SubjectRegistryError(f"{where}: dataset takes {', '.join(sorted(DATASET_FIELDS))}")
    if not isinstance(entry.get("class_noun"), str) or not entry["class_noun"].strip():
        raise SubjectRegistryError(f"{where}: class_noun is required (what the subject is, e.g. dog)")
    kind = entry.get("kind", "object")
    if kind not in KINDS:
        raise SubjectRegistryError(f"{where}: kind {kind!r}: use live, person or object")
    token = entry.get("token", "sks")
    if not isinstance(token, str) or not re.fullmatch(r"[^\s{}]+", token):
        raise SubjectRegistryError(f"{where}: token must be one word without braces")
    schedule = entry.get("schedule", "0 2 * * *")
    if schedule is not None and not isinstance(schedule, str):
        raise SubjectRegistryError(f"{where}: schedule is a cron expression in quotes, or null")
    timeout = entry.get("timeout_hours", 20)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise SubjectRegistryError(f"{where}: timeout_hours must be a positive number")
    approval = entry.get("require_approval", False)
    if not isinstance(approval, bool):
        raise SubjectRegistryError(f"{where}: require_approval is true or false")
    waits = entry.get("approval_timeout_hours", min(12, timeout / 2))
    if not isinstance(waits, (int, float)) or isinstance(waits, bool) or not 0 < waits < timeout:
        raise SubjectRegistryError(f"{where}: approval_timeout_hours must be above 0 and below timeout_hours "
                                   f"({timeout:g}): a run that times out while waiting would fail, not keep the champion")
    recipe = entry.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise SubjectRegistryError(f"{where}: recipe is a mapping of trigger-form settings")
    screen_policy = entry.get("screen_policy", "quarantine")
    if screen_policy not in SCREEN_POLICIES:
        raise SubjectRegistryError(f"{where}: screen_policy {screen_policy!r}: use quarantine or refuse")
    version = dataset.get("version", "main")
    if not isinstance(version, str) or not version:  # YAML reads 1.10 as the number 1.1
        raise SubjectRegistryError(f"{where}: dataset.version must be a Git tag, branch or commit in quotes")
    return Subject(name=name, class_noun=entry["class_noun"].strip(), token=token, kind=kind,
                   dataset_repo=dataset.get("repo"), dataset_path=str(dataset.get("path") or name),
                   dataset_version=version, schedule=schedule, on_new_data=bool(entry.get("on_new_data")),
                   timeout_hours=float(timeout), require_approval=approval, approval_timeout_hours=float(waits),
                   recipe=dict(recipe), screen_policy=screen_policy)


def add(registry: Path, name: str, entry: dict) -> bool:
    """Append subject `name` to the registry file, keeping every byte already in it (its comments too): False,
    untouched, when it is listed already. The entry must pass the rules the DAGs apply; the file is replaced in one
    rename, and only once the new text reads back as the old subjects plus this one (a registry written in another
    style, where appending would not mean that, is refused in one line with the entry to add by hand)."""
    import yaml

    text = registry.read_text() if registry.exists() else "subjects:\n"
    before = load(str(registry)) if registry.exists() else []
    if any(subject.name == name for subject in before):
        return False
    _subject(str(registry), name, entry)
    block = yaml.safe_dump({name: entry}, sort_keys=False, default_flow_style=None, width=100)
    new = text.rstrip("\n") + "\n" + "".join(f"  {line}\n" for line in block.splitlines())
    try:
        after = yaml.safe_load(new)
    except yaml.YAMLError:
        after = None
    if not isinstance(after, dict) or after.get("subjects", {}).get(name) != entry or \
            [s.name for s in before] + [name] != list(after["subjects"]):
        raise SubjectRegistryError(f"{registry}: cannot append to it safely (`subjects:` is not its last, block-style "
                                   f"mapping); add by hand under `subjects:`: {json.dumps({name: entry})}")
    temporary = registry.with_name(f".{registry.name}.new")
    temporary.write_text(new)
    if registry.exists():
        temporary.chmod(registry.stat().st_mode & 0o777)
    temporary.replace(registry)
    return True
