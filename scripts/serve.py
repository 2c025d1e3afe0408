"""`make serve`: the image server (python -m sd_tasks serve) over this machine's registry, the one `make demo` and
`make ui` register into, with the same models (DREAMLINE_MODELS, tiny by default).

    make serve                    each subject's champion on http://127.0.0.1:8000 (DREAMLINE_SERVING_PORT)
    make serve ALIAS=challenger   each subject's latest version: the demo's first version stays challenger

The API key is DREAMLINE_SERVING_API_KEY, or else the one in DREAMLINE_HOME/serving/api-key (made on first use,
readable by its owner only). It prints a curl command that writes an image.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.local import models  # noqa: E402


def api_key(home: Path) -> tuple[str, str]:
    """The key, and how a shell gets it (the variable, or the file)."""
    if os.environ.get("DREAMLINE_SERVING_API_KEY"):
        return os.environ["DREAMLINE_SERVING_API_KEY"], "$DREAMLINE_SERVING_API_KEY"
    path = home / "serving" / "api-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip(), f"$(cat {path})"


def main(argv: list[str]) -> int:
    home = Path(os.environ.get("DREAMLINE_HOME", REPO / ".dreamline")).resolve()
    try:
        chosen = models.chosen(os.environ, home / "models", Path.cwd())
    except ValueError as exc:
        print(f"error: make serve: {exc}", file=sys.stderr)
        return 1
    base = chosen["DREAMLINE_BASE_MODEL"]
    if not models.from_hub(chosen) and not (Path(base) / "model_index.json").exists():
        print(f"error: make serve: no models in {base}: run `make demo` first (it builds them and registers a "
              f"version to serve)", file=sys.stderr)
        return 1
    key, shown = api_key(home)
    port = os.environ.get("DREAMLINE_SERVING_PORT", "8000")
    alias = os.environ.get("ALIAS") or "champion"
    print(f"""Try, once it says it is serving:
  curl -s http://127.0.0.1:{port}/v1/subjects/dog/images -H "Authorization: Bearer {shown}" \\
    -H "Accept: image/png" -H "Content-Type: application/json" \\
    -d '{{"prompt": "a {{instance}} on a beach", "seed": 1}}' -o dog.png
""", flush=True)
    env = {**os.environ, **models.environment(chosen), "DREAMLINE_HOME": str(home), "DREAMLINE_SERVING_API_KEY": key}
    argv = [sys.executable, "-m", "sd_tasks", "serve", f"--base-model={base}", f"--port={port}", f"--alias={alias}",
            *argv]
    os.chdir(REPO)
    os.execve(sys.executable, argv, env)  # the server in this process's place: Ctrl-C and SIGTERM reach it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
