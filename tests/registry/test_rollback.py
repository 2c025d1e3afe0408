"""Moving `champion` with a record: the `promote` and `rollback` steps and `move_champion`, on a real MLflow registry
(sqlite under DREAMLINE_HOME). Versions are registered directly, without training: only the registry is tested."""
from __future__ import annotations

import itertools
import json
import os
import re

import pytest

from sd_tasks import cli
from sd_tasks.core import tracking
from sd_tasks.core.errors import StepError
from sd_tasks.registry import promotion
from sd_tasks.registry.promotion import HISTORY, PromoteConfig, RollbackConfig, move_champion, promote, rollback

AT = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
_names = itertools.count()


@pytest.fixture
def model(home, tmp_path) -> str:
    """A registered model with versions 1, 2 and 3 and a description; version 1 is champion (set the old way)."""
    client, name = tracking.client(), f"dog-sdxl-lora-{next(_names)}"
    client.create_registered_model(name, description="SDXL LoRA of the sample dog.")
    for _ in range(3):
        client.create_model_version(name, source=tmp_path.as_uri(), run_id=None)
    client.set_registered_model_alias(name, promotion.CHAMPION, "1")
    return name


def champion(name: str) -> str:
    return str(tracking.client().get_registered_model(name).aliases[promotion.CHAMPION])


def test_the_alias_is_the_one_register_uses():
    from sd_tasks.registry import register

    assert promotion.CHAMPION == register.CHAMPION


def test_promote_then_roll_back_moves_the_alias_and_records_who_why_and_when(model, tmp_path):
    approved = promote(PromoteConfig(model_name=model, version=2, by="bob", reason="sharper ears"))
    assert champion(model) == "2"
    assert approved == {"model_name": model, "version": 2, "previous": 1, "action": "approved", "by": "bob",
                        "reason": "sharper ears", "at": approved["at"], "changed": True,
                        "promoted": True, "aliases": ["champion"]}  # as register's result, for the notifier
    out = tmp_path / "rollback"
    back = rollback(RollbackConfig(model_name=model, version=1, reason="v2 draws the wrong dog", by="alice",
                                   output=str(out)))
    assert champion(model) == "1"
    assert (back["previous"], back["action"], back["changed"]) == (2, "rolled back", True)
    assert json.loads((out / "rollback.json").read_text()) == back

    client = tracking.client()
    tags = client.get_model_version(model, "1").tags
    assert {k: v for k, v in tags.items() if k.startswith("champion.")} == {
        "champion.action": "rolled back", "champion.by": "alice", "champion.reason": "v2 draws the wrong dog",
        "champion.previous": "2", "champion.at": back["at"]}
    assert re.fullmatch(AT, back["at"])
    assert client.get_model_version(model, "2").tags["champion.previous"] == "1"  # its own promotion's record

    description = client.get_registered_model(model).description
    assert description.startswith("SDXL LoRA of the sample dog.\n\n" + HISTORY + "\n")
    assert description.split(HISTORY + "\n")[1].splitlines() == [
        f"- {approved['at']}: v1 -> v2, approved by bob: sharper ears",
        f"- {back['at']}: v2 -> v1, rolled back by alice: v2 draws the wrong dog"]


def test_moving_to_the_current_champion_records_nothing(model):
    client = tracking.client()
    before = client.get_registered_model(model).description
    result = move_champion(client, model, 1, by="alice", reason="again", action="rolled back")
    assert result["changed"] is False and result["previous"] == 1
    assert client.get_registered_model(model).description == before
    assert "champion.by" not in client.get_model_version(model, "1").tags


def test_a_first_champion_replaces_none(home, tmp_path):
    client, name = tracking.client(), f"fresh-{next(_names)}"
    client.create_registered_model(name)
    client.create_model_version(name, source=tmp_path.as_uri(), run_id=None)
    result = move_champion(client, name, "1", by="register", reason="first version", action="promoted")
    assert result["previous"] is None and champion(name) == "1"
    assert client.get_model_version(name, "1").tags["champion.previous"] == "none"
    assert client.get_registered_model(name).description == \
        f"{HISTORY}\n- {result['at']}: none -> v1, promoted by register: first version\n"


def test_unknown_model_version_and_empty_reason_are_refused_in_one_line(model):
    with pytest.raises(StepError, match=rf"^model '{model}' has no version 9$"):
        rollback(RollbackConfig(model_name=model, version=9, reason="bad", by="alice"))
    with pytest.raises(StepError, match=r"^model 'no-such-model' is not registered$"):
        rollback(RollbackConfig(model_name="no-such-model", version=1, reason="bad", by="alice"))
    with pytest.raises(StepError, match=rf"^model '{model}' version 1: --reason is empty"):
        rollback(RollbackConfig(model_name=model, version=1, reason="  ", by="alice"))
    with pytest.raises(StepError, match=rf"^model '{model}' has no version 7$"):
        promote(PromoteConfig(model_name=model, version=7, by="bob"))
    assert champion(model) == "1"


def test_the_cli_prints_one_json_line_or_refuses_with_65(model, capsys, monkeypatch):
    monkeypatch.setenv("USER", "carol")  # who rolls back, when --by is not given
    assert cli.main(["rollback", "--model-name", model, "--version", "3", "--reason", "v3 it is"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and champion(model) == "3"
    assert {k: json.loads(out[0])[k] for k in ("version", "previous", "by")} == {"version": 3, "previous": 1,
                                                                                 "by": "carol"}
    assert cli.main(["rollback", "--model-name", model, "--version", "9", "--reason", "x"]) == cli.EXIT_REFUSED
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: rollback: model '{model}' has no version 9\n"


def test_history_keeps_text_after_it_and_drops_its_oldest_lines_to_fit():
    described = f"Intro.\n\n{HISTORY}\n- one\n- two\n\n## Notes\nkeep me\n"
    assert promotion.with_history_line(described, "- three") == \
        f"Intro.\n\n{HISTORY}\n- one\n- two\n- three\n\n## Notes\nkeep me\n"
    text = promotion.with_history_line(f"Intro.\n\n{HISTORY}\n" + "".join(f"- line {i}\n" for i in range(20)),
                                       "- newest", limit=160)
    assert text == f"Intro.\n\n{HISTORY}\n{promotion.DROPPED}\n- line 18\n- line 19\n- newest\n"
    assert promotion.with_history_line(text, "- later", limit=160).startswith(  # still says lines were dropped
        f"Intro.\n\n{HISTORY}\n{promotion.DROPPED}\n- line 19\n")


def test_an_approval_is_refused_when_champion_moved_since_the_comparison(model):
    """v2 was compared with champion v1; during the approval wait somebody rolled back to v3: the approval rests on a
    comparison with a champion that no longer is, so `promote` refuses and the champion stays."""
    rollback(RollbackConfig(model_name=model, version=3, reason="v1 draws the wrong dog", by="alice"))
    with pytest.raises(StepError, match=rf"^model '{model}': champion is v3 now, v1 when version 2 was compared with "
                                        r"it \(moved during the approval wait\): not promoted"):
        promote(PromoteConfig(model_name=model, version=2, by="bob", compared_with=1))
    assert champion(model) == "3"
    with pytest.raises(StepError, match="champion is v3 now, none when version 2 was compared"):
        promote(PromoteConfig(model_name=model, version=2, by="bob", compared_with=0))
    # compared with the champion that still is: promoted; approving the champion itself again changes nothing
    assert promote(PromoteConfig(model_name=model, version=2, by="bob", compared_with=3))["changed"]
    assert not promote(PromoteConfig(model_name=model, version=2, by="bob", compared_with=3))["changed"]


@pytest.mark.parametrize("step, options", [
    ("champion", ["--output", "{tmp}/champion"]),
    ("lineage", ["--dataset", "{tmp}/dataset", "--base-model", "base", "--recipe-hash", "r"]),
])
def test_an_unreachable_registry_is_not_taken_for_no_model_yet(step, options, tmp_path):
    """Only "not registered" or "no such alias" mean there is no champion: with the tracking server down, `champion`
    must not say "none" (the night would not defend it) nor `lineage` "no version yet" (it would train from scratch):
    the step fails with exit 1, which Airflow retries."""
    import socket
    import subprocess
    import sys

    from sd_tasks.core.storage import write_dir, write_json

    with write_dir(str(tmp_path / "dataset")) as out:
        write_json(out / "dataset.json", {"hash": "md5:x"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    done = subprocess.run([sys.executable, "-m", "sd_tasks", step, "--model-name", "dog-sdxl-lora",
                           *[o.format(tmp=tmp_path) for o in options]], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == cli.EXIT_CRASHED, (done.stdout, done.stderr)
    assert done.stdout == "" and done.stderr.startswith(f"error: {step}: MLflow at http://127.0.0.1:{port}: ")
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback
