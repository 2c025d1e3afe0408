"""Consent records (sd_tasks.data.consent) through the real steps: `publish-dataset --consent` versions a record beside
the photos, `dataset --consent required` refuses a person's dataset without a record that covers training today (one
line, exit 65, nothing written), and the record's id travels with the dataset to the registered version."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, timedelta

import pytest

from conftest import REPO, SAMPLE

TODAY = date.today()


def record(tmp_path, name="consent.json", **changes) -> str:
    data = {"id": "consent-2026-014", "given_by": "Jane Doe", "given_at": (TODAY - timedelta(days=30)).isoformat(),
            "expires": (TODAY + timedelta(days=335)).isoformat(), "scope": ["training", "serving"],
            "form": "dms://legal/consent/2026-014", **changes}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def step(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd_tasks", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    """A registry with jane (a current record), joe (none), ann (expired), lee (serving only)."""
    tmp = tmp_path_factory.mktemp("consent")
    repo, remote = tmp / "registry", tmp / "remote"
    records = {"jane": record(tmp, "jane.json"), "joe": None,
               "ann": record(tmp, "ann.json", given_at="2024-01-01", expires=(TODAY - timedelta(days=1)).isoformat()),
               "lee": record(tmp, "lee.json", scope=["serving"])}
    for name, consent in records.items():
        done = step("publish-dataset", f"--source={SAMPLE}", f"--repo={repo}", f"--path=people/{name}",
                    f"--tag={name}-v1", f"--remote={remote}", *([f"--consent={consent}"] if consent else []))
        assert done.returncode == 0, done.stderr
    return {"repo": repo, "tmp": tmp}


def test_a_person_with_a_current_record_is_fetched_with_its_id(people, tmp_path):
    done = step("dataset", f"--repo={people['repo']}", "--path=people/jane", "--rev=jane-v1", "--consent=required",
                f"--output={tmp_path}/out")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["consent_id"] == "consent-2026-014"
    written = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert written["consent"] == {"consent.id": "consent-2026-014", "consent.expires": (TODAY + timedelta(
        days=335)).isoformat(), "consent.scope": "training,serving"}
    assert "Jane" not in (tmp_path / "out" / "dataset.json").read_text()  # the id, not the person's name
    assert not list((tmp_path / "out" / "images").rglob("*.consent.json"))  # not one of the photos


@pytest.mark.parametrize("name, consent, says", [
    ("joe", "required", "no consent record; a subject of kind person is trained only with one"),
    ("ann", "required", f"consent consent-2026-014 expired on {TODAY - timedelta(days=1)}; nothing is trained"),
    ("ann", "optional", "expired on"),  # an expired record stops training whatever the subject's kind
    ("lee", "required", "covers serving, not training"),
])
def test_training_without_consent_that_covers_it_is_refused_in_one_line(people, tmp_path, name, consent, says):
    done = step("dataset", f"--repo={people['repo']}", f"--path=people/{name}", f"--rev={name}-v1",
                f"--consent={consent}", f"--output={tmp_path}/out")
    assert done.returncode == 65 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"people/{name}.consent.json" in done.stderr or name == "joe"
    assert not (tmp_path / "out").exists()


def test_an_object_needs_no_record(people, tmp_path):
    done = step("dataset", f"--repo={people['repo']}", "--path=people/joe", "--rev=joe-v1", f"--output={tmp_path}/o")
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["consent_id"] == "none"


@pytest.mark.parametrize("changes, says", [
    ({"scope": ["training", "marketing"]}, "scope ['training', 'marketing'] must list some of training, serving"),
    ({"expires": "2020-01-01", "given_at": "2021-01-01"}, "expires 2020-01-01 is not after given_at 2021-01-01"),
    ({"given_at": "last week"}, "given_at 'last week' is not a date"),
    ({"form": ""}, "form must be a non-empty text"),
    ({"notes": "x"}, "a consent record has exactly"),
])
def test_a_malformed_record_is_refused_before_anything_is_published(people, tmp_path, changes, says):
    before = subprocess.run(["git", "rev-parse", "HEAD"], cwd=people["repo"], capture_output=True, text=True).stdout
    done = step("publish-dataset", f"--source={SAMPLE}", f"--repo={people['repo']}", "--path=people/sue",
                "--tag=sue-v1", f"--consent={record(tmp_path, **changes)}")
    assert done.returncode == 65 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    after = subprocess.run(["git", "rev-parse", "HEAD"], cwd=people["repo"], capture_output=True, text=True).stdout
    assert before == after and not (people["repo"] / "people" / "sue").exists()


def test_make_subject_publishes_a_person_only_with_a_consent_record(tmp_path):
    """scripts/subject.py (`make subject`): KIND=person without CONSENT is refused before anything is written; with
    it, the record is published beside the photos."""
    listing = tmp_path / "subjects.yaml"
    listing.write_text("subjects:\n  dog: {class_noun: dog, kind: live}\n")
    env = {"PATH": "/usr/bin:/bin", "DREAMLINE_HOME": str(tmp_path / "home"), "DREAMLINE_SUBJECTS": str(listing),
           "HOME": str(tmp_path), "NAME": "kim", "PHOTOS": str(SAMPLE), "TOKEN": "zqx", "CLASS": "person",
           "KIND": "person", "SCHEDULE": "none"}
    script = [sys.executable, str(REPO / "scripts" / "subject.py")]
    refused = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "KIND=person: CONSENT=FILE is required" in refused.stderr, refused.stderr
    assert listing.read_text().count("kim") == 0 and not (tmp_path / "home" / "data-registry").exists()
    added = subprocess.run(script, env={**env, "CONSENT": record(tmp_path)}, capture_output=True, text=True,
                           timeout=300)
    assert added.returncode == 0, added.stderr
    registry = tmp_path / "home" / "data-registry"
    assert json.loads((registry / "kim.consent.json").read_text())["id"] == "consent-2026-014"
    tracked = subprocess.run(["git", "ls-files"], cwd=registry, capture_output=True, text=True).stdout.split()
    assert "kim.consent.json" in tracked and "kind: person" in listing.read_text()
