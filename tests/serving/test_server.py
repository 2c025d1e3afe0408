"""The image server for real: `python -m sd_tasks serve` on the tiny SDXL, LoRAs trained and registered in MLflow
(sqlite), requests over HTTP. It serves each subject's `champion`, follows `promote` and `rollback` within its
refresh time, makes the same image from the same seed, and answers bad input with a 4xx and one line."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import date, timedelta

import psutil
import pytest
from PIL import Image

from conftest import REPO
from deploy.local.seaweedfs import free_ports

KEY = "test-serving-key-3b9d1e7f5a"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server(versions, models, home, tmp_path_factory):
    [port] = free_ports(1)
    log = tmp_path_factory.mktemp("serving") / "server.log"
    env = {**os.environ, "DREAMLINE_SERVING_API_KEY": KEY, "DREAMLINE_HOME": str(home)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sd_tasks", "serve", f"--base-model={models['sdxl']}",
                                 f"--port={port}", "--refresh-seconds=1", "--max-queue=2",
                                 f"--refiner-model={models['sdxl']}"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if call(url, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield {"url": url, "log": log, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def call(url: str, method: str, path: str, body: dict | None = None, key: str | None = KEY,
         accept: str = "application/json") -> tuple[int, dict | bytes, object]:
    """(status, JSON or bytes, headers (case-insensitive)); never raises on an HTTP error."""
    headers = {"Content-Type": "application/json", "Accept": accept, **({"Authorization": f"Bearer {key}"} if key
                                                                         else {})}
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers, method=method)
    try:
        with _NO_PROXY.open(request, timeout=120) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), exc.headers
    return status, (json.loads(raw) if (got.get("content-type") or "").startswith("application/json") else raw), got


def generate(server, subject="rex", **body):
    return call(server["url"], "POST", f"/v1/subjects/{subject}/images", {"prompt": "a {instance} on a beach",
                                                                           **body})


def test_the_champion_makes_images_that_can_be_made_again(server, versions):
    status, answer, _ = generate(server, seed=7, num_images=2, steps=3)
    assert status == 200, answer
    assert (answer["model"], answer["version"], answer["alias"]) == ("rex-sdxl-lora", versions["rex"][0], "champion")
    assert answer["prompt"] == "a sks dog on a beach" and [i["seed"] for i in answer["images"]] == [7, 8]
    images = [Image.open(io.BytesIO(base64.b64decode(i["png"]))) for i in answer["images"]]
    assert all(im.format == "PNG" and im.size == (64, 64) for im in images)
    again = generate(server, seed=7, num_images=2, steps=3)[1]
    assert [i["png"] for i in again["images"]] == [i["png"] for i in answer["images"]]  # the same seed, the same image
    status, png, headers = call(server["url"], "POST", "/v1/subjects/rex/images",
                                {"prompt": "a {instance} on a beach", "seed": 7, "steps": 3}, accept="image/png")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert headers["X-Dreamline-Version"] == str(versions["rex"][0]) and headers["X-Dreamline-Seed"] == "7"
    assert base64.b64decode(answer["images"][0]["png"]) == png


def test_a_request_may_ask_the_refiner_to_finish_its_images(server):
    """The tiny SDXL stands in for the refiner: an img2img pipeline of the same shapes."""
    plain = generate(server, seed=3, steps=5)[1]
    status, refined, _ = generate(server, seed=3, steps=5, refine=True)
    assert status == 200 and (plain["refine"], refined["refine"]) == (False, True)
    assert refined["images"][0]["png"] != plain["images"][0]["png"]
    assert generate(server, seed=3, steps=5, refine=True)[1]["images"][0]["png"] == refined["images"][0]["png"]


def test_promote_and_rollback_reach_the_server_within_its_refresh_time(server, versions):
    v1, v2 = versions["rex"]
    before = generate(server, seed=1, steps=2)[1]
    move = [sys.executable, "-m", "sd_tasks", "rollback", "--model-name=rex-sdxl-lora", "--reason=test", "--by=ci"]
    done = subprocess.run([*move, f"--version={v2}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    time.sleep(1.5)  # the server's --refresh-seconds
    after = generate(server, seed=1, steps=2)[1]
    assert (before["version"], after["version"]) == (v1, v2)
    assert after["images"][0]["png"] != before["images"][0]["png"]  # another LoRA drew it
    done = subprocess.run([*move, f"--version={v1}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    time.sleep(1.5)
    back = generate(server, seed=1, steps=2)[1]
    assert back["version"] == v1 and back["images"][0]["png"] == before["images"][0]["png"]  # swapped back exactly


@pytest.mark.parametrize("subject, body, key, status, says", [
    ("ghost", {}, KEY, 404, "no registered model ghost-sdxl-lora"),
    ("Rex/..", {}, KEY, 404, "Not Found"),
    ("cat", {}, KEY, 409, "broken images; never served"),
    ("owl", {}, KEY, 409, "has no 'champion' version yet"),
    ("junk", {}, KEY, 409, "never served"),
    ("kim", {}, KEY, 409, f"consent c-kim expired on {date.today() - timedelta(days=1)}; not served"),
    ("liv", {}, KEY, 409, "consent c-liv covers training, not serving; not served"),
    ("max", {}, KEY, 409, "consent c-max: its expires tag 'soon' is not a date; not served"),
    ("rex", {"width": 100}, KEY, 422, "width: Value error, must be a multiple of 8"),
    ("rex", {"width": 4096}, KEY, 422, "width, height: at most 2048"),
    ("rex", {"num_images": 99}, KEY, 422, "num_images: at most 4"),
    ("rex", {"steps": 1000}, KEY, 422, "steps: at most 100"),
    ("rex", {"steps": "many"}, KEY, 422, "steps: Input should be a valid integer"),
    ("rex", {"seed": -1}, KEY, 422, "seed: Input should be greater than or equal to 0"),
    ("rex", {"prompt": "a {instance} " + "very " * 100}, KEY, 422, "tokens, the text encoder reads at most 77"),
    ("rex", {"sampler": "x"}, KEY, 422, "sampler: Extra inputs are not permitted"),
    ("rex", {}, None, 401, "an API key is needed"),
    ("rex", {}, "wrong-key-0000000000", 401, "an API key is needed"),
    ("rex", {"steps": "many"}, None, 401, "an API key is needed"),  # the key first: nothing else is said without it
])
def test_bad_requests_get_a_4xx_and_one_line(server, subject, body, key, status, says):
    got, answer, _ = call(server["url"], "POST", f"/v1/subjects/{subject}/images",
                          {"prompt": "a {instance} on a beach", "steps": 2, **body}, key=key)
    assert got == status, answer
    assert says in answer["detail"] and "\n" not in answer["detail"], answer


def test_a_burst_past_the_queue_is_answered_429_not_queued_without_bound(server):
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(generate(server, steps=40, num_images=4)[0]))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 429 in answers and 200 in answers and set(answers) <= {200, 429}, answers


def test_subjects_metrics_and_no_key_in_the_log(server, versions):
    status, listed, _ = call(server["url"], "GET", "/v1/subjects")
    assert status == 200
    listed = {s["subject"]: s["version"] for s in listed["subjects"]}
    assert listed.items() >= {"rex": versions["rex"][0], "owl": None}.items()
    metrics = call(server["url"], "GET", "/metrics", key=None)[1].decode()
    assert 'dreamline_requests_total{status="200"}' in metrics and "dreamline_adapter_loads" in metrics
    assert KEY not in server["log"].read_text()
    assert call(server["url"], "GET", "/docs", key=None)[0] == 200  # the OpenAPI page


def test_make_serve_and_the_readmes_curl_write_a_png(versions, models, home, tmp_path):
    """The README's "Images of your subject": `make serve` (scripts/serve.py, here on a free port over this session's
    registry, whose subject is rex) and its curl command as written, which writes a PNG of the champion."""
    import re

    readme = (REPO / "README.md").read_text().split("## Images of your subject", 1)[1].split("\n## ")[0]
    serve, curl = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert serve.strip() == "make serve ALIAS=challenger"
    [port] = free_ports(1)
    env = {**{k: v for k, v in os.environ.items() if k != "DREAMLINE_SERVING_API_KEY"}, "DREAMLINE_HOME": str(home),
           "DREAMLINE_SERVING_PORT": str(port), "ALIAS": "champion"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py")], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "Uvicorn running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        key = home / "serving" / "api-key"
        assert key.stat().st_mode & 0o777 == 0o600
        command = (curl.replace("8000", str(port)).replace(".dreamline/", f"{home}/")  # this session's registry,
                   .replace("/subjects/dog/", "/subjects/rex/").replace("-o dog.png", f"-o {tmp_path}/dog.png"))
        done = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        image = Image.open(tmp_path / "dog.png")
        assert image.format == "PNG" and image.size == (64, 64)
        assert key.read_text().strip() not in log.read_text()
    finally:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        proc.terminate()  # as a service manager stops it: nothing may stay behind, serving on the port
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, alive
