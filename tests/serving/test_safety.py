"""What leaves the image API, a batch and an evaluation is screened and marked (sd_tasks.safety): a flagged image
is withheld with a reason (a 4xx from the API; left out of a batch with its reason in images.json; counted by
evaluate), and an image large enough to carry the mark carries it and says so. Flagging is shown with a stand-in
screen only the tests inject (tests/safety/stand_in_screen.py); the real detector runs everywhere else."""
from __future__ import annotations

import io
import json

from fastapi.testclient import TestClient
from PIL import Image

from sd_tasks.safety.credentials import Credentials, read
from sd_tasks.safety.marking import is_marked
from sd_tasks.serving.api import create_app
from sd_tasks.serving.champions import Champions
from sd_tasks.serving.renderer import LocalBackend, Renderer
from stand_in_screen import spec
from test_ca import make_chain
from serving.test_batch import step

KEY = "test-safety-key-0c5e2a91d7"
AUTH = {"Authorization": f"Bearer {KEY}"}


def api(models, tmp_path, screen: str, credentials: Credentials | None = None) -> TestClient:
    renderer = Renderer(models["sdxl"], screen=screen, credentials=credentials)
    return TestClient(create_app(LocalBackend(renderer), Champions(tmp_path / "adapters", refresh_seconds=0), KEY))


def test_a_served_image_the_screen_flags_is_withheld_with_a_422_and_the_reason(versions, models, tmp_path):
    with api(models, tmp_path, spec("FlagAll")) as client:
        answer = client.post("/v1/subjects/rex/images", headers=AUTH,
                             json={"prompt": "a photo of {instance}", "steps": 2, "num_images": 2, "width": 64,
                                   "height": 64})
    assert answer.status_code == 422, answer.text
    assert answer.json() == {"detail": "withheld: 2 of 2 images flagged by the screen (stand-in: every image (0.5))"}


def test_a_served_image_carries_the_mark_and_says_so(versions, models, tmp_path):
    with api(models, tmp_path, "nudenet") as client:  # the real detector: a tiny model's image is not flagged
        big = client.post("/v1/subjects/rex/images", headers={**AUTH, "Accept": "image/png"},
                          json={"prompt": "a photo of {instance}", "steps": 2, "width": 256, "height": 256, "seed": 1})
        small = client.post("/v1/subjects/rex/images", headers=AUTH,
                            json={"prompt": "a photo of {instance}", "steps": 2, "width": 64, "height": 64})
    assert big.status_code == 200, big.text
    assert big.headers["X-Dreamline-Watermark"] == "dwtDctSvd DRMLN1"
    image = Image.open(io.BytesIO(big.content)).convert("RGB")
    assert is_marked(image) and image.size == (256, 256)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=90)
    assert is_marked(Image.open(jpeg))
    assert small.json()["watermark"] == "none: smaller than 256x256 pixels"


def test_a_batch_leaves_out_what_the_screen_flags_and_says_why(versions, tmp_path):
    step("champion", "--model-name=rex-sdxl-lora", "--alias=champion", f"--output={tmp_path}/lora")
    made = step("generate", f"--lora={tmp_path}/lora", "--prompt=a photo of sks dog", "--seeds=5", "--seeds=6",
                "--steps=2", f"--screen={spec('FlagAll')}", f"--output={tmp_path}/images/prompt-0")
    assert (made["images"], made["withheld"]) == (0, 2)
    folder = tmp_path / "images" / "prompt-0"
    manifest = json.loads((folder / "images.json").read_text())
    assert manifest["images"] == {} and manifest["withheld"] == {"5": "stand-in: every image (0.5)",
                                                                 "6": "stand-in: every image (0.5)"}
    assert not list(folder.glob("*.png"))
    logged = step("batch-report", f"--images={tmp_path}/images", "--experiment=rex", "--run-name=flagged")
    assert (logged["images"], logged["withheld"]) == (0, 2)


def test_a_served_image_carries_content_credentials_naming_its_model_and_version(versions, models, tmp_path):
    chain = make_chain(tmp_path / "c2pa")
    credentials = Credentials.from_files(str(chain["chain"]), str(chain["key"]))
    with api(models, tmp_path, "off", credentials) as client:
        answer = client.post("/v1/subjects/rex/images", headers={**AUTH, "Accept": "image/png"},
                             json={"prompt": "a photo of {instance}", "steps": 2, "width": 256, "height": 256})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Dreamline-Credentials"] == "c2pa"
    facts = read(answer.content, chain["ca"].read_text())
    assert facts == {"generated": True, "model": "rex-sdxl-lora", "version": str(versions["rex"][0]),
                     "signer": "Dreamline image server", "trusted": True, "problems": []}
    assert is_marked(Image.open(io.BytesIO(answer.content)))


def test_the_server_refuses_half_or_unusable_credentials_in_one_line_before_loading(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "DREAMLINE_SERVING_API_KEY": KEY}
    for flags, expected in ((["--c2pa-cert=chain.pem"], "--c2pa-cert, --c2pa-key: give both"),
                            ([f"--c2pa-cert={tmp_path}/no.pem", f"--c2pa-key={tmp_path}/no.pem"], "cannot read it")):
        done = subprocess.run([sys.executable, "-m", "sd_tasks", "serve", "--base-model=/nonexistent",
                               f"--adapters={tmp_path}/adapters", *flags], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 65 and expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
            done.stderr
