"""Step inputs and outputs are URIs: a local path or any fsspec URL (s3://bucket/key with s3fs installed).

Steps work on local directories. `read_dir` gives a local view of an input (remote inputs are downloaded to a
cache), `write_dir` gives a local staging directory that becomes the output only when the step succeeds.

A folder written by `write_dir` is *whole* only once its completion marker, `.dreamline-complete.json`, is there:
the marker lists every file with its size and is written last. Locally the folder appears by one rename, marker
included. On an object store (S3 has no rename) publishing removes the old marker, then the old files, uploads the
new files and writes the marker last. A writer killed at any point leaves a folder without a marker, and `remove`
deletes the marker first, so a half-deleted folder is no longer whole either. (Uploading to a staging prefix and
copying it into place would keep nothing whole for longer, since the old folder goes first either way, and would
write every byte twice.) Readers of outputs that may be cut short (resume, the encode, class-image and evaluation
caches) trust only whole folders (`is_whole`, `read_dir(..., whole=True)`); a folder with a marker whose files do
not match it is refused by every reader, with an IncompleteFolder error that a retry can get past.

S3 is configured by the environment, the standard AWS way (checked with s3fs 2026.9, botocore 1.43, dvc-s3 3.3):
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a role), and for an S3-compatible store (MinIO, SeaweedFS, Ceph)
AWS_ENDPOINT_URL_S3=http://host:port. That one variable serves s3:// step URIs here, DVC's S3 remotes (the data
registry) and boto3 alike. AWS_ENDPOINT_URL (all AWS services) and FSSPEC_S3_ENDPOINT_URL (fsspec only) also work
for step URIs. MLflow's artifact client reads its own MLFLOW_S3_ENDPOINT_URL. A remote input is cached under
SD_TASKS_CACHE (default: <tmp>/sd_tasks-cache) by its URI and its files' sizes and ETags, so a folder rewritten in
place is fetched again, and two processes fetching one folder at once both end with a whole copy.

A writer killed before publishing leaves its staging folder; the next writer of that folder on the same host
removes it once its process is gone (a fetcher's, in the cache, likewise).

Two failures of the environment end a step in one line naming the folder (`Unavailable`, exit 1, so it is retried):
a full disk while a folder is written (its staging folder is removed; the last whole version stays), and an object
store that does not answer once botocore's and s3fs's own retries are spent. One that hangs (accepts connections,
answers nothing) takes about 7 minutes with s3fs's defaults; fsspec's `FSSPEC_S3` variable sets shorter ones, e.g.
'{"config_kwargs": {"connect_timeout": 2, "read_timeout": 2, "retries": {"max_attempts": 1}}}' (docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import fsspec

from sd_tasks.core.errors import IncompleteFolder, StepError, Unavailable
from sd_tasks.core.object_store import is_remote, object_store

MARKER = ".dreamline-complete.json"
WRITING = ".dreamline-writing"  # on an object store, while a writer replaces the folder (it has no rename)
STAGING = ".staging-"  # in a local writer's (or fetcher's) hidden staging folder: `.<name>.staging-<host>-<pid>-<id>`


def _staging(parent: Path, name: str) -> Path:
    """A new hidden staging folder for `parent/name`, named after this host and process. One left there by a
    process of this host that is gone (a killed writer's) is removed first, so kills do not fill the disk; a live
    writer's is left alone."""
    mine = f".{name}{STAGING}{socket.gethostname()}-"
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            pid, *rest = entry.name.removeprefix(mine).split("-")  # <pid>-<random>: mkdtemp's have no dash
            if entry.name.startswith(mine) and len(rest) == 1 and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _local(uri: str) -> Path:
    return Path(str(uri).removeprefix("file://")).expanduser()


def _listing(uri: str) -> dict[str, dict]:
    """{relative path: info} of every file under `uri`, leaving out writers' staging folders; {} if none."""
    if not is_remote(uri):
        root = _local(uri)
        if not root.is_dir():
            return {}
        return {p.relative_to(root).as_posix(): {"size": p.stat().st_size} for p in sorted(root.rglob("*"))
                if p.is_file() and not _in_staging(p.relative_to(root).as_posix())}
    fs, path = fsspec.core.url_to_fs(uri)
    path = path.rstrip("/")
    fs.invalidate_cache(path)  # another process (another pod) may have written since this one last looked
    with object_store(uri):
        found = fs.find(path, detail=True)
    return {name[len(path) + 1:]: info for name, info in sorted(found.items())
            if name.startswith(path + "/") and not _in_staging(name[len(path) + 1:])}


def _in_staging(relative: str) -> bool:
    return any(part.startswith(".") and STAGING in part for part in relative.split("/"))


def _marker(files: dict[str, dict]) -> dict:
    return {"format": 1, "files": {name: info["size"] for name, info in files.items() if name != MARKER}}


def _why_not_whole(uri: str, files: dict[str, dict]) -> str | None:
    """Why the folder with these files is not whole, or None when it is."""
    if not files:
        return "no such directory"
    marker = None
    if MARKER in files:
        try:
            with _open(join(uri, MARKER), "r") as f:
                marker = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    if marker is None:
        return "no completion marker (its writer was stopped before it finished)"
    for name, size in marker["files"].items():
        if name not in files:
            return f"{name} is missing"
        if files[name]["size"] != size:
            return f"{name} has {files[name]['size']} bytes, not the {size} written"
    return None


def _open(uri: str, mode: str):
    return fsspec.open(uri if is_remote(uri) else str(_local(uri)), mode)


def is_whole(uri: str) -> bool:
    """Whether `uri` is a folder that `write_dir` finished: its marker is there, and every file the marker lists,
    at its size."""
    return why_not_whole(uri) is None


def why_not_whole(uri: str) -> str | None:
    return _why_not_whole(uri, _listing(uri))


def whole_folders(root: Path) -> list[Path]:
    """The whole folders under a local folder (from `read_dir`), leaving out writers' staging folders."""
    return [m.parent for m in sorted(root.rglob(MARKER))
            if not _in_staging(m.relative_to(root).as_posix()) and is_whole(str(m.parent))]


def read_dir(uri: str, whole: bool = False) -> Path:
    """A local directory holding the contents of `uri`. A folder with a completion marker must match it; with
    `whole`, the marker must be there too (for outputs that a killed writer may have left half-written)."""
    if not is_remote(uri):
        path = _local(uri)
        if not path.is_dir():
            raise StepError(f"{uri}: no such directory")
        if whole or (path / MARKER).exists():
            _require_whole(uri, _listing(uri))
        return path
    files = _listing(uri)
    if not files:
        raise StepError(f"{uri}: no such directory")
    if whole or MARKER in files:
        _require_whole(uri, files)
    described = [uri, [(n, i.get("size"), i.get("ETag") or i.get("LastModified")) for n, i in files.items()]]
    cache = Path(os.environ.get("SD_TASKS_CACHE", Path(tempfile.gettempdir()) / "sd_tasks-cache"))
    target = cache / hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()[:20]
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        staging = _staging(cache, target.name)
        try:
            fs, path = fsspec.core.url_to_fs(uri)
            with object_store(uri):
                fs.get([f"{path.rstrip('/')}/{n}" for n in files], [str(staging / n) for n in files])
            if _listing(uri) != files:  # rewritten while it was fetched: the copy may mix two versions
                raise IncompleteFolder(f"{uri}: changed while it was read; read it again")
            try:
                staging.rename(target)
            except OSError:  # a concurrent step (the mapped train tasks, say) fetched it first: keep its copy
                if not target.is_dir():
                    raise
        finally:  # a fetch cut short leaves nothing in the cache (after the rename, nothing is left here)
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _require_whole(uri: str, files: dict[str, dict]) -> None:
    problem = _why_not_whole(uri, files)
    if problem:
        raise IncompleteFolder(f"{uri}: incomplete folder: {problem}")


@contextlib.contextmanager
def write_dir(uri: str) -> Iterator[Path]:
    """Stage an output directory locally; publish it to `uri` (replacing what was there) only on success, with its
    completion marker written last. Only a folder a writer made can be replaced (one with a completion marker, or an
    object-store folder a writer was stopped while replacing) or an empty one: anything else (the user's photos, a
    folder that holds other things) is refused before the step works, in one line."""
    check_replaceable(uri)
    if not is_remote(uri):
        final = _local(uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = _staging(final.parent, final.name)
    else:
        staging = Path(tempfile.mkdtemp(prefix="sd_tasks-out-"))
    staging.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary folders
    try:
        with _disk_full_is_one_line(uri, staging):
            yield staging
            for path in staging.rglob("*"):  # some writers (safetensors) create files private to their user
                if not path.is_symlink():
                    path.chmod(0o755 if path.is_dir() else 0o644)
            (staging / MARKER).unlink(missing_ok=True)
            files = _listing(str(staging))
            marker = json.dumps(_marker(files), indent=1, sort_keys=True) + "\n"
            if is_remote(uri):
                with object_store(uri):
                    _publish_remote(staging, list(files), uri, marker)
            else:
                (staging / MARKER).write_text(marker)
                (staging / MARKER).chmod(0o644)
                old = final.with_name(f".{final.name}.old")
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    (final / MARKER).unlink(missing_ok=True)
                    final.rename(old)
                staging.rename(final)
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _disk_full_is_one_line(uri: str, staging: Path) -> Iterator[None]:
    """A full disk, in one line naming the folder: safetensors and torch.save report it without the file's name (and
    torch without the errno: "unexpected pos"), so a write that fails on a nearly full disk is taken for one."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, (Unavailable, StepError, IncompleteFolder)) or not (
                getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)
                or shutil.disk_usage(staging.parent).free < 2**20):
            raise
        raise Unavailable(f"{uri}: no space left on device to write it ({shutil.disk_usage(staging.parent).free} bytes "
                          f"free in {staging.parent}); the last whole version stays") from None


def check_replaceable(uri: str) -> None:
    """Refuse to write a folder over one that no writer made (see `write_dir`)."""
    files = _listing(uri)
    if not is_remote(uri) and _local(uri).exists() and not _local(uri).is_dir():
        raise StepError(f"{uri}: is a file, not a folder; name a folder for the output")
    names = {n for n in files if "/" not in n}
    if files and not names & {MARKER, WRITING}:
        raise StepError(f"{uri}: holds {len(files)} files that no Dreamline step wrote (no {MARKER}); refusing to "
                        f"replace them: name a new or empty folder for the output")


def check_output(output: str, inputs: list[str], option: str = "--output") -> None:
    """Refuse, before any work, an output folder that is, contains or lies inside one of `inputs` (links
    resolved): writing it would replace the input, or put the output among the files it is read from."""
    for given in inputs:
        if _overlaps(output, given):
            raise StepError(f"{option} {output}: is, contains or lies inside the input {given}; write the output "
                            f"to a folder of its own")


def _overlaps(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        scheme_a, scheme_b = str(a).split("://")[0], str(b).split("://")[0]
        if not (is_remote(a) and is_remote(b)) or scheme_a != scheme_b:
            return False
        a, b = str(a).rstrip("/") + "/", str(b).rstrip("/") + "/"
        return a.startswith(b) or b.startswith(a)
    a, b = os.path.realpath(_local(a)), os.path.realpath(_local(b))
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def _publish_remote(staging: Path, names: list[str], uri: str, marker: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    path = path.rstrip("/")
    fs.pipe_file(f"{path}/{WRITING}", b"")  # first: a writer stopped from here on left a folder it may replace
    _remove_remote(fs, path)
    fs.pipe_file(f"{path}/{WRITING}", b"")  # (the removal took it too)
    if names:
        fs.put([str(staging / n) for n in names], [f"{path}/{n}" for n in names])
    fs.pipe_file(f"{path}/{MARKER}", marker.encode())  # last: from here on the folder is whole
    fs.rm_file(f"{path}/{WRITING}")
    fs.invalidate_cache(path)


def _remove_remote(fs, path: str) -> None:
    """Marker first: a folder whose deletion is cut short is no longer whole."""
    fs.invalidate_cache(path)
    if fs.exists(f"{path}/{MARKER}"):
        fs.rm_file(f"{path}/{MARKER}")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def whole_jsons(uri: str, name: str) -> dict[str, dict]:
    """{folder URI: its parsed `name`} for every whole folder at or under `uri` that holds `name`, reading only the
    listing, the markers and those files: a step that needs an evaluation's metrics.json does not fetch its images."""
    files = _listing(uri)
    found = {}
    for marker in (n for n in files if n == MARKER or n.endswith("/" + MARKER)):
        folder = marker[: -len(MARKER)].rstrip("/")
        prefix = f"{folder}/" if folder else ""
        inside = {n[len(prefix):]: info for n, info in files.items() if n.startswith(prefix)}
        where = join(uri, folder) if folder else uri.rstrip("/")
        if name in inside and _why_not_whole(where, inside) is None:  # (_listing leaves staging folders out)
            found[where] = read_json(join(where, name))
    return found


def read_bytes(uri: str) -> bytes:
    """One file's bytes (a remote one fetched alone, not its folder)."""
    try:
        with object_store(uri), _open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StepError(f"{uri}: no such file") from None


def read_json(uri: str) -> dict:
    try:
        with object_store(uri), _open(uri, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StepError(f"{uri}: no such file") from None
    except json.JSONDecodeError as exc:
        raise StepError(f"{uri}: not valid JSON ({exc})") from None


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def write_file(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a part (a rename locally; a
    single PUT on object stores)."""
    if is_remote(uri):
        with object_store(uri), fsspec.open(uri, "wb") as f:
            f.write(data)
        return
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def list_dir(uri: str) -> list[str]:
    """Names in a folder; an empty list when it does not exist."""
    if not is_remote(uri):
        path = _local(uri)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(path)
    with object_store(uri):
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) if fs.exists(path) else []


def remove(uri: str) -> None:
    """Delete a folder, its completion marker first (a deletion cut short leaves a folder that is not whole)."""
    if not is_remote(uri):
        (_local(uri) / MARKER).unlink(missing_ok=True)
        shutil.rmtree(_local(uri), ignore_errors=True)
        return
    fs, path = fsspec.core.url_to_fs(uri)
    with object_store(uri):
        _remove_remote(fs, path.rstrip("/"))


def remove_file(uri: str) -> None:
    """Delete one file; nothing to do when it is not there."""
    if not is_remote(uri):
        _local(uri).unlink(missing_ok=True)
        return
    fs, path = fsspec.core.url_to_fs(uri)
    with object_store(uri):
        if fs.exists(path):
            fs.rm_file(path)


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])
