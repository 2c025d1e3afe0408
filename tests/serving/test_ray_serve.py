"""The image API on Ray Serve (sd_tasks.serving.ray_app) on a local Ray cluster on the CPU: the same app, its images
made by two replicas multiplexed by adapter, over this session's registry. Requests for a subject reach the replica
that already holds its adapter; a refused LoRA found by a replica still comes back as a 409 with one line."""
from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image

from conftest import REPO
from deploy.local.seaweedfs import free_ports
from serving.test_server import KEY, call

SUBJECTS = ("rex", "fox")


@pytest.fixture(scope="module")
def ray_url(versions, models, home):
    import ray
    from ray import serve

    from sd_tasks.serving.ray_app import build

    [port] = free_ports(1)
    env = {"PYTHONPATH": str(REPO), "DREAMLINE_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "DREAMLINE_SERVING_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, object_store_memory=200 * 2**20,
             runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"base_model": models["sdxl"], "dtype": "float32", "gpus_per_replica": 0,
                         "min_replicas": 2, "max_replicas": 2, "refresh_seconds": 1}),
                  name="dreamline", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def generate(url, subject, seed=7):
    status, answer, _ = call(url, "POST", f"/v1/subjects/{subject}/images",
                             {"prompt": "a {instance} on a beach", "seed": seed, "steps": 2})
    assert status == 200, answer
    return answer


def test_requests_for_a_subject_reach_the_replica_that_holds_its_adapter(ray_url, versions):
    first = {subject: generate(ray_url, subject)["replica"] for subject in SUBJECTS}  # each adapter loads somewhere
    time.sleep(2)  # the replicas tell Ray's routers which adapters they hold
    reached = {subject: set() for subject in SUBJECTS}
    for seed in range(4):
        for subject in SUBJECTS:
            answer = generate(ray_url, subject, seed)
            assert (answer["model"], answer["version"]) == (f"{subject}-sdxl-lora", versions[subject][0]
                                                            if subject == "rex" else versions[subject])
            reached[subject].add(answer["replica"])
    assert reached == {subject: {first[subject]} for subject in SUBJECTS}
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["png"])))
    assert image.format == "PNG" and image.size == (64, 64)


def test_bad_input_through_ray_is_a_4xx_with_one_line(ray_url):
    for subject, status, says in [("ghost", 404, "no registered model"), ("junk", 409, "never served"),
                                  ("cat", 409, "broken images")]:
        got, answer, _ = call(ray_url, "POST", f"/v1/subjects/{subject}/images", {"prompt": "a photo", "steps": 2})
        assert got == status and says in answer["detail"] and "\n" not in answer["detail"], answer
    got, answer, _ = call(ray_url, "POST", "/v1/subjects/rex/images", {"prompt": "x", "refine": True})
    assert got == 422 and answer["detail"] == "refine: this server has no refiner model"
    assert call(ray_url, "POST", "/v1/subjects/rex/images", {"prompt": "x"}, key=None)[0] == 401
