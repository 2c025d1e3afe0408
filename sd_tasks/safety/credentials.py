"""C2PA Content Credentials on served images: a signed manifest, inside the PNG, saying the image is algorithmic
media (IPTC's `trainedAlgorithmicMedia`) created by Dreamline with model `<name>` version `<n>`.

`c2pa-python` (the Content Authenticity Initiative's library) writes and reads the manifest. Signing needs the
deployment's certificate chain and private key (PEM files, e.g. a Kubernetes Secret mounted into the server); the
end-entity certificate must allow digital signatures and name an extended key usage C2PA accepts (emailProtection or
documentSigning); a self-signed one signs, but no reader will trust it. The suite makes a chain with a test CA
(tests/safety/test_ca.py). A reader trusts a signature when the chain ends in one of its trust anchors: the
C2PA trust list for public certificates, or your CA's certificate given to `read`.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from sd_tasks.core.errors import StepError

GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


@dataclass(frozen=True)
class Credentials:
    """What signs: the certificate chain (end entity first) and its private key, PEM."""

    chain: bytes
    key: bytes
    algorithm: str = "es256"

    @classmethod
    def from_files(cls, chain: str, key: str, algorithm: str = "es256") -> "Credentials":
        """The PEM files a deployment mounts; one line naming the setting when one cannot be used."""
        if algorithm not in ALGORITHMS:
            raise StepError(f"--c2pa-algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
        texts = {}
        for setting, path in (("--c2pa-cert", chain), ("--c2pa-key", key)):
            try:
                texts[setting] = Path(path).read_bytes()
            except OSError as exc:
                raise StepError(f"{setting} {path}: cannot read it ({exc.strerror})") from None
            if b"-----BEGIN " not in texts[setting]:
                raise StepError(f"{setting} {path}: not a PEM file")
        credentials = cls(texts["--c2pa-cert"], texts["--c2pa-key"], algorithm)
        try:  # at start-up, not on the first request: a key that does not match its certificate fails here
            credentials.sign(png_of_one_pixel(), "check", 0)
        except Exception as exc:  # c2pa's errors carry the reason in their text
            raise StepError(f"--c2pa-cert {chain}, --c2pa-key {key}: cannot sign with them ({one_line(exc)})") from None
        return credentials

    def sign(self, png: bytes, model: str, version: int | str) -> bytes:
        """The PNG with a signed manifest: created by Dreamline, trained algorithmic media, model and version."""
        import c2pa

        manifest = {
            "claim_generator_info": [{"name": "Dreamline"}], "title": f"{model} version {version}",
            "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": GENERATED,
                "softwareAgent": {"name": "Dreamline"},
                "parameters": {"model": str(model), "version": str(version)}}]}}],
        }
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.algorithm.encode(), self.chain, self.key, None))
        with signer, c2pa.Builder(json.dumps(manifest)) as builder:
            out = io.BytesIO()
            builder.sign(signer, "image/png", io.BytesIO(png), out)
        return out.getvalue()


def read(data: bytes, trust_anchors: str | None = None, format: str = "image/png") -> dict | None:
    """The active manifest's facts: `generated` (the digital source type says algorithmic), `model`, `version`,
    `signer`, and `trusted` (the signature checks out and its chain ends in `trust_anchors`, PEM); None without a
    manifest."""
    import c2pa

    settings = {"verify": {"verify_trust": True}, **({"trust": {"trust_anchors": trust_anchors}} if trust_anchors
                                                        else {})}
    context = c2pa.Context(settings=c2pa.Settings.from_json(json.dumps(settings)))
    try:
        with c2pa.Reader(format, io.BytesIO(data), None, context) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError as exc:
        if "ManifestNotFound" in type(exc).__name__ or "not found" in str(exc).lower():
            return None
        raise
    manifest = store["manifests"][store["active_manifest"]]
    created = [a for assertion in manifest.get("assertions", []) if assertion["label"].startswith("c2pa.actions")
               for a in assertion["data"]["actions"] if a.get("action") == "c2pa.created"]
    parameters = created[0].get("parameters", {}) if created else {}
    codes = {s["code"] for s in store.get("validation_results", {}).get("activeManifest", {}).get("success", [])}
    failures = store.get("validation_status") or []
    return {"generated": any(a.get("digitalSourceType") == GENERATED for a in created),
            "model": parameters.get("model"), "version": parameters.get("version"),
            "signer": manifest.get("signature_info", {}).get("common_name"),
            "trusted": "signingCredential.trusted" in codes and not failures,
            "problems": [f["code"] for f in failures]}


def png_of_one_pixel() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="PNG")
    return out.getvalue()


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
