"""Which version serves a subject (sd_tasks.serving.champions), against this session's MLflow registry: the alias
as it moves, whole downloads, and a registry that stops answering."""
from __future__ import annotations

import pytest

from deploy.local.seaweedfs import free_ports
from sd_tasks.serving.champions import Champions, NotServable


def test_a_registry_that_stops_answering_keeps_the_last_version_served(versions, tmp_path, monkeypatch):
    champions = Champions(tmp_path / "adapters", refresh_seconds=0)  # every request looks the alias up again
    first = champions.served("rex")
    assert first.version == versions["rex"][0] and (first.lora / "pytorch_lora_weights.safetensors").is_file()
    [port] = free_ports(1)  # nothing listens there: the tracking server is down
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert champions.served("rex") == first  # what the registry said last stands
    with pytest.raises(NotServable) as never_resolved:
        champions.served("owl")
    assert never_resolved.value.status == 503 and "cannot be reached" in never_resolved.value.reason
    with pytest.raises(NotServable) as listing:
        champions.subjects()
    assert listing.value.status == 503


def test_an_adapter_is_downloaded_once_and_whole(versions, tmp_path):
    champions = Champions(tmp_path / "adapters", refresh_seconds=0)
    served = champions.served("rex")
    weights = served.lora / "pytorch_lora_weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert champions.served("rex").lora == served.lora and weights.stat().st_mtime_ns == stamp  # not again
    assert sorted(p.name for p in served.lora.parent.iterdir()) == [str(served.version)]  # no staging left
    with pytest.raises(NotServable) as junk:
        champions.served("junk")
    assert junk.value.status == 409 and not (tmp_path / "adapters" / "junk-sdxl-lora" / "1").exists()
