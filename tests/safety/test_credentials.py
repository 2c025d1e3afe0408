"""C2PA Content Credentials (sd_tasks.safety.credentials) with a test CA made here: signed, read back by the C2PA
reader as trained algorithmic media of model and version, trusted only under the CA; credentials that cannot sign
are one line at start-up."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from sd_tasks.core.errors import StepError
from sd_tasks.safety.credentials import Credentials, read
from sd_tasks.safety.marking import is_marked, mark
from test_ca import make_chain

PHOTO = Image.new("RGB", (256, 256), (40, 90, 160))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory.mktemp("c2pa"))


def test_a_signed_png_reads_back_as_generated_by_its_model_and_version(chain):
    credentials = Credentials.from_files(str(chain["chain"]), str(chain["key"]))
    marked = mark(Image.effect_noise((256, 256), 60).convert("RGB"))
    signed = credentials.sign(png(marked), "rex-sdxl-lora", 3)
    facts = read(signed, chain["ca"].read_text())
    assert facts == {"generated": True, "model": "rex-sdxl-lora", "version": "3", "signer": "Dreamline image server",
                     "trusted": True, "problems": []}
    assert read(signed)["trusted"] is False  # without the CA as a trust anchor: signed, but by nobody known
    assert read(signed)["problems"] == ["signingCredential.untrusted"]
    assert read(png(PHOTO)) is None  # no manifest
    assert is_marked(Image.open(io.BytesIO(signed)))  # the manifest leaves the pixels, and so the mark, alone


def test_a_tampered_image_no_longer_validates(chain):
    signed = Credentials.from_files(str(chain["chain"]), str(chain["key"])).sign(png(PHOTO), "rex-sdxl-lora", 3)
    image = Image.open(io.BytesIO(signed))
    image.load()
    pixels = image.copy()
    pixels.putpixel((0, 0), (255, 0, 0))
    tampered = io.BytesIO()
    pixels.save(tampered, format="PNG", pnginfo=None)
    # the manifest travels in its own chunk: copy it onto the changed pixels and the hash no longer matches
    chunks = signed[8:]
    manifest = b""
    while chunks:
        length = int.from_bytes(chunks[:4], "big")
        if chunks[4:8] == b"caBX":
            manifest = chunks[:12 + length]
        chunks = chunks[12 + length:]
    assert manifest
    data = tampered.getvalue()
    forged = data[:33] + manifest + data[33:]  # after IHDR, as the signer wrote it
    facts = read(forged, chain["ca"].read_text())
    assert not facts["trusted"] and facts["problems"] == ["assertion.dataHash.mismatch"]


@pytest.mark.parametrize("case", ["another key", "missing", "not pem", "wrong algorithm"])
def test_credentials_that_cannot_sign_are_one_line_naming_the_setting(chain, tmp_path, case):
    cert, key, algorithm = str(chain["chain"]), str(chain["key"]), "es256"
    if case == "another key":  # the CA's certificate with the server's key
        cert = str(chain["ca"])
    elif case == "missing":
        key = str(tmp_path / "none.pem")
    elif case == "not pem":
        (tmp_path / "junk.pem").write_text("junk")
        cert = str(tmp_path / "junk.pem")
    else:
        algorithm = "rot13"
    with pytest.raises(StepError) as refused:
        Credentials.from_files(cert, key, algorithm)
    line = str(refused.value)
    assert "\n" not in line and line.startswith("--c2pa-")
    assert {"another key": "cannot sign with them", "missing": "cannot read it", "not pem": "not a PEM file",
            "wrong algorithm": "one of es256"}[case] in line
