"""A Hugging Face Hub on 127.0.0.1 for tests: the tiny offline models served under the real model ids, by commit.

Just enough of the hub's HTTP API for huggingface_hub, transformers and diffusers: a repository's info at a
revision (its commit and file list), its file tree, a file's HEAD (commit, ETag, size) and GET (a download,
recorded). Repositories have commits: `publish` adds one and moves `main` to it, as a push upstream does; `stop`
takes the hub down (connections refused), `start` brings it back on the same port. Gated repositories answer 401
with the hub's GatedRepo error code.

    hub = FakeHub()
    sha = hub.publish("stabilityai/stable-diffusion-xl-base-1.0", folder_files(tiny_sdxl, extra=BIG_FILES))
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": ...}
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from pathlib import Path

# Files real repositories hold beside what the steps load (single-file checkpoints, fp16 variants, ONNX, OpenVINO,
# Flax, TensorFlow, .bin duplicates): served, so a test can require that none is ever fetched.
UNUSED = {
    "pipeline": ["sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
                 "unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
                 "unet/model.onnx", "text_encoder_2/openvino_model.bin", "vae_decoder/model.onnx",
                 "text_encoder/flax_model.msgpack", "unet/diffusion_pytorch_model.bin"],
    "model": ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
}
# The real ids of the production models, and which of the tiny models each serves.
REAL_IDS = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "clip": "openai/clip-vit-large-patch14",
            "dino": "facebook/dino-vits16"}


def folder_files(folder: Path | str, unused: list[str] = ()) -> dict[str, bytes]:
    """A local model folder as a repository's files, plus stand-ins for files the steps must never fetch."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith(".dreamline")}
    return {**files, **{name: b"not for the steps: " + name.encode() for name in unused}}


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"main": sha, "commits": {sha: {path: bytes}}, "gated": bool}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.downloads: list[str] = []  # "<repo>/<file>" of every GET of a file
        self.heads: list[str] = []
        self._server = None
        self.port = 0
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, repo: str, files: dict[str, bytes], gated: bool = False) -> str:
        """A new commit of `repo` holding `files`; `main` moves to it. Returns its sha."""
        entry = self.repos.setdefault(repo, {"commits": {}, "main": None, "gated": gated})
        sha = hashlib.sha1(f"{repo}:{len(entry['commits'])}".encode()
                           + b"".join(hashlib.sha1(c).digest() for _, c in sorted(files.items()))).hexdigest()
        entry["commits"][sha] = dict(files)
        entry["main"] = sha
        return sha

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def start(self) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.port = self._server.server_port
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def files(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        entry = self.repos.get(repo)
        if entry is None:
            return None
        sha = entry["main"] if revision == "main" else revision
        return (sha, entry["commits"][sha]) if sha in entry["commits"] else None

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?", path)
                download = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                found = api or download
                repo = found and found.group(1)
                if not found or repo not in hub.repos:
                    return self.error(404, "RepoNotFound")
                if hub.repos[repo]["gated"] and not self.headers.get("authorization"):
                    return self.error(401, "GatedRepo")
                revision = (api.group(3) if api else download.group(2)) or "main"
                commit = hub.files(repo, revision)
                if commit is None:
                    return self.error(404, "RevisionNotFound")
                sha, files = commit
                if api and api.group(2) == "tree":  # recursive listing of a folder (the whole tree without one)
                    folder = (api.group(4) or "").strip("/")
                    entries = [{"type": "file", "path": f, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                               for f, c in sorted(files.items()) if not folder or f.startswith(folder + "/")]
                    return self.send(json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)
                if api:
                    info = {"id": repo, "modelId": repo, "sha": sha, "private": False, "disabled": False,
                            "gated": hub.repos[repo]["gated"] and "auto", "tags": [],
                            "siblings": [{"rfilename": f} for f in sorted(files)]}
                    return self.send(json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                name = download.group(3)
                if name not in files:
                    return self.error(404, "EntryNotFound")
                (hub.downloads if body else hub.heads).append(f"{repo}/{name}")
                etag = '"%s"' % hashlib.sha1(files[name]).hexdigest()
                self.send(files[name], {"X-Repo-Commit": sha, "ETag": etag}, body)

            def error(self, status: int, code: str):
                self.send(json.dumps({"error": code}).encode(), {"X-Error-Code": code, "X-Error-Message": code},
                          body=self.command != "HEAD", status=status)

            def send(self, content: bytes, headers: dict, body: bool, status: int = 200):
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(content))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def log_message(self, *args):
                pass

        return Handler
