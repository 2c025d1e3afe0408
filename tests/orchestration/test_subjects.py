"""The subject registry (a YAML file or an Airflow Variable) and the lineage check that lets a night skip a subject
whose data, recipe, base model and code are what its model was trained from."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from dreamline import subjects
from dreamline.subjects import SubjectRegistryError
from test_dag import PARSE, airflow_env


def test_the_shipped_registry_lists_the_sample_subjects():
    dog, backpack = subjects.load(str(REPO / "dags" / "subjects.yaml"))
    assert (dog.name, dog.dag_id, dog.model_name, dog.on_new_data) == ("dog", "lora_dog", "dog-sdxl-lora", True)
    assert (backpack.kind, backpack.token, backpack.dataset_path) == ("object", "zwx", "backpack")
    assert dog.dataset_asset().uri != backpack.dataset_asset().uri
    assert all((REPO / "sample_data" / s.dataset_path).is_dir() for s in (dog, backpack))


def test_a_subject_can_require_a_reviewers_approval(tmp_path):
    from dreamline.params import dag_params

    path = tmp_path / "subjects.yaml"
    path.write_text("subjects:\n  cat: {class_noun: cat, require_approval: true, approval_timeout_hours: 4}\n"
                    "  dog: {class_noun: dog}\n")
    cat, dog = subjects.load(str(path))
    assert (cat.require_approval, cat.approval_timeout_hours, dog.require_approval) == (True, 4.0, False)
    assert dag_params(cat)["require_approval"].value is True and dag_params(dog)["require_approval"].value is False
    assert dog.approval_timeout_hours == 10  # half the run's 20 h timeout, at most 12


@pytest.mark.parametrize("entry, message", [
    ("cat: {token: sks}", "subject 'cat': class_noun is required"),
    ("Cat: {class_noun: cat}", "subject 'Cat': names are lower-case"),
    ("cat: {class_noun: cat, kind: animal}", "kind 'animal': use live, person or object"),
    ("cat: {class_noun: cat, colour: red}", "unknown settings colour"),
    ("cat: {class_noun: cat, dataset: {version: 1.10}}", "dataset.version must be a Git tag, branch or commit in "
                                                         "quotes"),
    ("cat: {class_noun: cat, schedule: 5}", "schedule is a cron expression in quotes, or null"),
    ("cat: {class_noun: cat, token: 'two words'}", "token must be one word"),
    ("cat: {class_noun: cat, require_approval: 'yes'}", "require_approval is true or false"),
    ("cat: {class_noun: cat, timeout_hours: 6, approval_timeout_hours: 6}", "approval_timeout_hours must be above 0 "
                                                                            r"and below timeout_hours \(6\)"),
])
def test_a_wrong_entry_is_refused_in_one_line_naming_the_file_and_subject(tmp_path, entry, message):
    path = tmp_path / "subjects.yaml"
    path.write_text(f"subjects:\n  {entry}\n")
    with pytest.raises(SubjectRegistryError, match=message) as refused:
        subjects.load(str(path))
    assert str(refused.value).startswith(f"{path}: ") and "\n" not in str(refused.value)


def parse_dags(tmp_path, registry: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", PARSE, str(REPO / "dags")], capture_output=True, text=True,
                          env=airflow_env(tmp_path, DREAMLINE_SUBJECTS=registry, **env), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_recipe_that_breaks_the_forms_rules_fails_dag_parsing_naming_the_setting(tmp_path):
    path = tmp_path / "subjects.yaml"
    path.write_text("subjects:\n  cat: {class_noun: cat, recipe: {learning_rates: [0.0001, 0.0001]}}\n")
    out = parse_dags(tmp_path, str(path))
    [error] = out["errors"].values()
    assert out["dags"] == ["batch_images", "publish_dataset"] and "subject 'cat': recipe.learning_rates=[0.0001, 0.0001]" in error


def test_the_registry_can_be_an_airflow_variable(tmp_path):
    registry = {"subjects": {"cat": {"class_noun": "cat", "schedule": None},
                             "teapot": {"class_noun": "teapot", "recipe": {"max_steps": 300}}}}
    out = parse_dags(tmp_path, "variable:dreamline_subjects", AIRFLOW_VAR_DREAMLINE_SUBJECTS=json.dumps(registry))
    assert out["errors"] == {} and out["dags"] == ["batch_images", "lora_cat", "lora_teapot", "publish_dataset"]


def test_two_subjects_never_share_a_run_folder_experiment_model_or_asset(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    from dreamline.deployment import DEPLOYMENT

    bag = DagBag(dag_folder=str(REPO / "dags"))
    dog, backpack = bag.dags["lora_dog"], bag.dags["lora_backpack"]
    run_id = "scheduled__2026-11-24T02:00:00+00:00"  # both nights share run ids: the folder is per DAG
    assert DEPLOYMENT.run_dir(dog.dag_id, run_id) != DEPLOYMENT.run_dir(backpack.dag_id, run_id)
    assert (dog.params["subject"], backpack.params["subject"]) == ("dog", "backpack")  # experiment and model name


# -- the lineage step, on a real MLflow registry -------------------------------------------------------------------

def register_version(client, name: str, alias: str, tags: dict) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # it exists
    version = client.create_model_version(name, source="file:///tmp/lora", tags=tags).version
    client.set_registered_model_alias(name, alias, version)
    return version


def test_lineage_says_nothing_changed_until_the_dataset_does(home, tmp_path):
    from sd_tasks.core import tracking
    from sd_tasks.core.storage import write_dir, write_json
    from sd_tasks.registry import lineage
    from sd_tasks.registry.register import lineage_tags

    def dataset(content_hash: str) -> str:
        uri = str(tmp_path / content_hash.replace(":", "-"))
        with write_dir(uri) as out:
            write_json(out / "dataset.json", {"hash": content_hash})
        return uri

    client = tracking.client()
    name = "lineage-test-sdxl-lora"
    check = lambda data, recipe="sha256:r", base="base": lineage.run(lineage.LineageConfig(  # noqa: E731
        model_name=name, dataset=dataset(data), recipe_hash=recipe, base_model=base))
    first = check("sha256:d1")
    assert first["changed"] and first["reason"] == f"no version of {name} yet"
    register_version(client, name, "champion", lineage_tags("sha256:d1", "sha256:r", "base"))
    unchanged = check("sha256:d1")
    assert not unchanged["changed"] and unchanged["same_as"] == "v1 (champion)"
    assert unchanged["reason"].startswith("nothing changed since v1 (champion) was trained: same dataset content")
    # a new dataset version, a new recipe, a base model at another commit: each named with what it was and is
    assert check("sha256:d2")["reason"] == "v1 (champion): changed dataset content (sha256:d1 -> sha256:d2)"
    assert check("sha256:d1", recipe="sha256:r2")["reason"] == "v1 (champion): changed recipe (sha256:r -> sha256:r2)"
    assert check("sha256:d1", base="other")["changed"]
    sha1, sha2 = "0123456789ab" + "0" * 28, "fedcba987654" + "1" * 28
    register_version(client, name, "champion", lineage_tags("sha256:d1", "sha256:r", f"org/sdxl@{sha1}"))
    assert check("sha256:d1", base=f"org/sdxl@{sha2}")["reason"] == \
        "v2 (champion): changed base model (org/sdxl@0123456789ab -> org/sdxl@fedcba987654)"
    register_version(client, name, "champion", lineage_tags("sha256:d1", "sha256:r", "base"))  # back as it was
    # a challenger that lost was trained from d2: training it again would only repeat it
    register_version(client, name, "challenger", lineage_tags("sha256:d2", "sha256:r", "base"))
    assert check("sha256:d2")["same_as"] == "v4 (challenger)"


def test_a_subject_is_appended_keeping_every_byte_of_the_registry(tmp_path):
    from dreamline import subjects

    registry = tmp_path / "subjects.yaml"
    original = (REPO / "dags" / "subjects.yaml").read_text()
    registry.write_text(original)
    entry = {"token": "sks", "class_noun": "dog", "kind": "live", "dataset": {"path": "rex", "version": "main"},
             "schedule": "0 3 * * *", "on_new_data": True}
    assert subjects.add(registry, "rex", entry)
    text = registry.read_text()
    assert text.startswith(original.rstrip("\n")) and "# The subjects Dreamline trains" in text  # comments kept
    loaded = {s.name: s for s in subjects.load(str(registry))}
    assert list(loaded) == ["dog", "backpack", "rex"] and loaded["rex"].schedule == "0 3 * * *"
    assert not subjects.add(registry, "rex", {**entry, "class_noun": "cat"}) and registry.read_text() == text
    # an entry the DAGs would refuse, and a registry where appending would not add it, leave the file as it was
    with pytest.raises(subjects.SubjectRegistryError, match="kind 'pet': use live, person or object"):
        subjects.add(registry, "tom", {**entry, "kind": "pet"})
    flow = tmp_path / "flow.yaml"
    flow.write_text("subjects: {dog: {class_noun: dog}}\nother: 1\n")
    with pytest.raises(subjects.SubjectRegistryError, match="cannot append to it safely"):
        subjects.add(flow, "rex", entry)
    assert flow.read_text() == "subjects: {dog: {class_noun: dog}}\nother: 1\n" and registry.read_text() == text
