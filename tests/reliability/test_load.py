"""Load: ten subjects' DAG runs queued at once on the full stack (full_stack.py), two GPU slots. All ten succeed, the
pool's cap holds, and nothing is mixed between subjects: MLflow experiments and registered models, the run folders
in S3 and the shared encode cache each hold only their own subject's data."""
from __future__ import annotations

import json

import pytest

from reliability.full_stack import GPU_SLOTS, RUN_ID, SUBJECT_DATA, dag_id
from stack_client import GPU_TASKS, bucket_keys, most_at_once, query
from deploy.local.bootstrap import s3_client
from dreamline import deployment

pytestmark = pytest.mark.reliability


def run_folder(subject: str) -> str:
    return f"runs/{dag_id(subject)}/{deployment.run_folder(RUN_ID)}/"


def foreign_marks(full_stack, subject: str) -> dict[str, list[str]]:
    """What names another subject's data: its dataset's content hash, its dataset version and its run folder."""
    return {other: [published["hash"], published["tag"], run_folder(other)]
            for other, published in full_stack["published"].items() if other != subject}


def mixed(full_stack, subject: str, text: str) -> list[str]:
    return [other for other, marks in foreign_marks(full_stack, subject).items() if any(m in text for m in marks)]


def failures(full_stack) -> dict:
    return {name: {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in r["tasks"] if t["state"] != "success"}
            for name, r in full_stack["runs"].items() if r["run"]["state"] != "success"}


def test_ten_subjects_at_once_all_succeed_within_the_gpu_pool(full_stack, figures):
    runs = full_stack["runs"]
    succeeded = sum(r["run"]["state"] == "success" for r in runs.values())
    gpu = [t for r in runs.values() for t in r["tasks"] if t["task_id"].split(".")[-1] in GPU_TASKS
           and t["state"] == "success"]  # those that ran (a skipped one has a start and end date too)
    peak = most_at_once(gpu)
    # On a busy machine a task's own parse of the DAG file can pass Airflow's 30 s import timeout: Airflow then
    # reschedules the task (no try spent) rather than failing it. Counted, as the price of the load.
    logs = full_stack["folder"] / "airflow" / "logs"
    rescheduled = sum("Rescheduling task during startup" in log.read_text(errors="replace")
                      for log in logs.glob("dag_id=lora_s*/run_id=*/task_id=*/**/attempt=*.log"))
    figures.record("load", "10 subjects at once", f"{succeeded} of 10 runs succeeded; at most {peak} GPU steps "
                   f"ran at once on a pool of {GPU_SLOTS}", runs=10, succeeded=succeeded, max_gpu_at_once=peak,
                   seconds=round(full_stack["seconds"]), lost=10 - succeeded, rescheduled_at_start=rescheduled)
    assert succeeded == 10, failures(full_stack)
    api = full_stack["api"]
    assert api.get(f"{api.base}/pools/gpu").json()["slots"] == GPU_SLOTS
    assert {t["pool"] for t in gpu} == {"gpu"}
    # every GPU step of every run: 1 encode, 1 train, 2 evaluate tasks (one per slot: the rate, the base model),
    # 1 confirmation (the selected checkpoint and the base model in one process)
    assert len(gpu) == 10 * 5, sorted({t["task_id"] for t in gpu})
    assert peak == GPU_SLOTS  # the pool was used to the full and never beyond


def test_each_experiment_holds_only_its_own_subjects_runs(full_stack):
    settings = full_stack["settings"]
    for subject in SUBJECT_DATA:
        published = full_stack["published"][subject]
        rows = query(settings, "mlflow", "SELECT r.run_uuid, t.key, t.value FROM runs r JOIN experiments e USING "
                                         "(experiment_id) JOIN tags t ON t.run_uuid = r.run_uuid WHERE e.name = %s "
                                         "UNION ALL SELECT r.run_uuid, p.key, p.value FROM runs r JOIN experiments e "
                                         "USING (experiment_id) JOIN params p ON p.run_uuid = r.run_uuid "
                                         "WHERE e.name = %s", subject, subject)
        runs = {run for run, _, _ in rows}
        assert len(runs) == 2, runs  # the parent run and its one learning rate's training run
        hashes = {value for _, key, value in rows if key == "dataset.hash"}
        assert hashes == {published["hash"]}, (subject, hashes)
        assert {value for _, key, value in rows if key == "dataset.rev"} == {f"{subject}-v1"}
        assert {run for run, key, _ in rows if key == "dataset.hash"} == runs  # every run names its dataset
        assert {value for _, key, value in rows if key == "experiment"} == {subject}  # the training run's param
        for run, key, value in rows:
            assert not mixed(full_stack, subject, value), (subject, run, key, value)


def test_each_registered_model_and_champion_belongs_to_its_subject(full_stack):
    settings = full_stack["settings"]
    for subject in SUBJECT_DATA:
        model = f"{subject}-sdxl-lora"
        versions = query(settings, "mlflow", "SELECT mv.version, e.name, mv.description FROM model_versions mv "
                                             "JOIN runs r ON r.run_uuid = mv.run_id JOIN experiments e USING "
                                             "(experiment_id) WHERE mv.name = %s", model)
        assert [(v, experiment) for v, experiment, _ in versions] == [(1, subject)], versions
        aliases = query(settings, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                        model)
        assert sorted(aliases) == [("challenger", 1), ("champion", 1)]
        tags = dict(query(settings, "mlflow", "SELECT key, value FROM model_version_tags WHERE name = %s AND "
                                              "version = 1", model))
        published = full_stack["published"][subject]
        assert (tags["dataset.hash"], tags["dataset.rev"], tags["dataset.path"]) == \
            (published["hash"], f"{subject}-v1", subject)
        assert not mixed(full_stack, subject, json.dumps(tags) + versions[0][2])  # the tags and the model card


def test_each_run_folder_in_s3_holds_only_its_subjects_data(full_stack):
    settings = full_stack["settings"]
    s3 = s3_client(settings)
    for subject, (noun, subset) in SUBJECT_DATA.items():
        keys = bucket_keys(settings, run_folder(subject))
        images = sorted(k.rsplit("/", 1)[1] for k in keys if k.startswith(f"{run_folder(subject)}dataset/images/"))
        assert images == [f"{stem}.jpg" for stem in subset], (subject, images)
        dataset = json.loads(s3.get_object(Bucket=settings.bucket, Key=f"{run_folder(subject)}dataset/dataset.json")
                             ["Body"].read())
        assert (dataset["hash"], dataset["rev"], dataset["path"]) == \
            (full_stack["published"][subject]["hash"], f"{subject}-v1", subject)
        for key in (k for k in keys if k.endswith((".json", ".md", ".txt"))):  # every record the steps wrote
            text = s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read().decode(errors="replace")
            assert not mixed(full_stack, subject, text), (subject, key)


def test_encode_cache_entries_are_keyed_by_content_never_shared(full_stack):
    settings, api = full_stack["settings"], full_stack["api"]
    s3 = s3_client(settings)
    entries = {}
    for subject, (noun, subset) in SUBJECT_DATA.items():
        encoded = api.get(f"{api.base}/dags/{dag_id(subject)}/dagRuns/{RUN_ID}/taskInstances/encode/xcomEntries/"
                          "return_value", params={"map_index": 0}).json()
        cache = encoded["value"]["cache"]
        entries[subject] = cache
        # the subject's training run trained on that entry
        assert query(settings, "mlflow", "SELECT p.value FROM params p JOIN runs r USING (run_uuid) JOIN experiments "
                                         "e USING (experiment_id) WHERE e.name = %s AND p.key = 'cache'",
                     subject) == [(cache,)]
        key = f"{cache.removeprefix(f's3://{settings.bucket}/')}/manifest.json"
        manifest = json.loads(s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read())
        assert sorted(r["source"] for r in manifest["records"]) == [f"{stem}.jpg" for stem in subset], \
            (subject, manifest["records"])
        assert all(f"sks {noun}" in r["caption"] for r in manifest["records"]), (subject, manifest["records"])
    assert len(set(entries.values())) == len(SUBJECT_DATA), entries  # ten contents, ten entries
