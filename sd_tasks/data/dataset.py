"""Datasets are versioned in a DVC data registry: a Git repo whose `.dvc` files point at a remote (a local folder
or S3). A version is a Git rev (tag, branch or commit); every run records the commit it resolved to and a content
hash of the exact files, so "which images did this LoRA see?" always has an answer.

`dataset` (run) resolves a version to files; `publish-dataset` (publish) adds a folder as a new version.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError, Unavailable
from sd_tasks.core.redact import redact
from sd_tasks.core.storage import write_dir, write_json
from sd_tasks.data.consent import Consent, parse, record_name, refusal


@dataclass
class DatasetConfig:
    """Fetch one subject's images at a dataset version from a DVC data registry."""

    repo: str = option("data registry: a Git URL or local path of a repo tracked with DVC")
    path: str = option("the subject's folder inside the registry, e.g. dog")
    output: str = option("URI to write the images and dataset.json to")
    rev: str = option("Git rev of the registry: tag, branch or commit", "main")
    consent: str = option("the subject's consent record (<path>.consent.json): required (a subject of kind person: "
                          "refused without one that covers training today) or optional (recorded when there is one)",
                          "optional")


def run(config: DatasetConfig) -> dict:
    """The dataset at `rev`. A remote registry is cloned into this step's own scratch folder (DVC's clones, its
    temporary cache and its site cache, keyed by the clone's path, go there), removed on success and on failure. A
    user and token in an http(s) URL travel as a request header in this process's Git settings (GIT_CONFIG_*, which
    dulwich and git read), never in the URL the clone's `.git/config` records: no file on disk ever holds them."""
    from dvc.repo.open_repo import clean_repos

    repo, header = split_credentials(config.repo)
    scratch, before = tempfile.mkdtemp(prefix="sd_tasks-dataset-"), tempfile.tempdir
    settings = {} if os.path.exists(repo) else {"DVC_SITE_CACHE_DIR": os.path.join(scratch, "dvc-site-cache")}
    tempfile.tempdir = scratch
    try:
        with environment(settings | git_header(repo, header)):
            return fetch(replace(config, repo=repo), shown=redact(config.repo))
    finally:
        clean_repos()
        tempfile.tempdir = before
        shutil.rmtree(scratch, ignore_errors=True)


def split_credentials(url: str) -> tuple[str, str | None]:
    """An http(s) URL without its user and password, and the Basic authorization header they make (None without)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), f"Authorization: Basic {token}"


def git_header(url: str, header: str | None) -> dict[str, str]:
    """The Git settings that send `header` with every request to `url`, after any the deployment set (its
    GIT_CONFIG_* Secret)."""
    if header is None:
        return {}
    n = int(os.environ.get("GIT_CONFIG_COUNT") or 0)
    return {"GIT_CONFIG_COUNT": str(n + 1), f"GIT_CONFIG_KEY_{n}": f"http.{url}.extraHeader",
            f"GIT_CONFIG_VALUE_{n}": header}


@contextlib.contextmanager
def environment(settings: dict[str, str]):
    """This process's environment (and its children's) with `settings`; as it was afterwards."""
    saved = dict(os.environ)
    os.environ.update(settings)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def fetch(config: DatasetConfig, shown: str) -> dict:
    """The files at `rev`; `shown` is the registry as errors and the record name it (a token in the URL masked)."""
    from dvc.api import DVCFileSystem

    check_subject_path(config.path)
    repo = shown
    try:
        fs = DVCFileSystem(config.repo, rev=config.rev)
        commit = fs.repo.scm.get_rev()
        info = fs.info(config.path)
    except FileNotFoundError:
        raise StepError(f"{repo}: no {config.path!r} at rev {config.rev!r}") from None
    except Exception as exc:  # dvc/scmrepo raise many types for a bad repo or rev
        said = redact(f"{repo}@{config.rev}: {reasons(exc)}")
        if re.search(r"Connection refused|timed out|Temporary failure in name resolution|Network is unreachable|"
                     r"Connection reset", said):
            raise Unavailable(said) from None  # the host may come back: a retry can help
        raise StepError(said) from None
    if info["type"] != "directory":
        raise StepError(f"{repo}: {config.path!r} at rev {config.rev!r} is not a folder")
    record = consent_for_training(fs, config, repo)
    with write_dir(config.output) as out:
        images = out / "images"
        fs.get(config.path.rstrip("/") + "/", str(images), recursive=True)
        files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file())
        result = {
            "repo": repo,
            "path": config.path,
            "rev": config.rev,
            "commit": commit,
            "dvc_md5": info.get("md5"),
            "hash": content_hash(images),
            "num_files": len(files),
            "consent_id": record.id if record else "none",
        }
        write_json(out / "dataset.json", {**result, "files": files,
                                          "consent": record.tags() if record else None})
    return {**result, "images": f"{config.output}/images"}


def consent_for_training(fs, config: DatasetConfig, repo: str) -> Consent | None:
    """The subject's consent record at `rev`, refused in one line unless it covers training today; None when there
    is none and none is required."""
    if config.consent not in ("required", "optional"):
        raise StepError(f"--consent {config.consent!r}: required or optional")
    name = record_name(config.path)
    shown = f"{repo}@{config.rev}: {name}"
    if not fs.exists(name):
        if config.consent == "required":
            raise StepError(f"{shown}: no consent record; a subject of kind person is trained only with one that "
                            f"covers training (publish-dataset --consent FILE)")
        return None
    with fs.open(name, "rb") as f:
        record = parse(f.read(64 * 1024).decode("utf-8", "replace"), shown)
    if reason := refusal(record, "training", date.today()):
        raise StepError(f"{shown}: {reason}; nothing is trained")
    return record


def content_hash(folder: Path) -> str:
    """sha256 over (relative path, file sha256) pairs: the same files give the same hash wherever they live."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()


@dataclass
class PublishConfig:
    """Add a folder of images to a DVC data registry (created if missing) as a new tagged version."""

    source: str = option("local folder of images to publish")
    repo: str = option("local path of the data registry (a Git repo with DVC); created when missing")
    path: str = option("the subject's folder inside the registry, e.g. dog")
    tag: str = option("Git tag naming this version, e.g. dog-v1")
    remote: str | None = option("DVC remote (local folder or s3://...) for a new registry", None)
    consent: str | None = option("a consent record (JSON: id, given_by, given_at, expires, scope, form) published "
                                 "with this version as <path>.consent.json", None)


def publish(config: PublishConfig) -> dict:
    source, repo = Path(config.source), Path(config.repo)
    if not TAG.fullmatch(config.tag):
        raise StepError(f"--tag {config.tag!r}: a Git tag of letters, digits and ._/- not starting with - or .")
    if not source.is_dir() or not any(source.iterdir()):
        raise StepError(f"{source}: not a folder with files")
    check_subject_path(config.path, repo)  # publishing replaces that folder: it must be one the registry can lose
    if source.resolve() == repo.resolve() or source.resolve().is_relative_to(repo.resolve()) \
            or repo.resolve().is_relative_to(source.resolve()):
        raise StepError(f"{source}: the registry itself or a folder inside it; publish a folder from outside the "
                        f"registry")
    if link := next((p for p in sorted(source.rglob("*")) if p.is_symlink()), None):  # copytree would follow it
        raise StepError(f"{link}: symbolic link; publish a folder of regular files (what it points to may be private)")
    record = None
    if config.consent:
        try:
            record = Path(config.consent).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StepError(f"--consent {config.consent}: cannot read it ({exc})") from None
        parse(record, f"--consent {config.consent}")
    if not (repo / ".dvc").is_dir():
        if not config.remote:
            raise StepError(f"{repo}: not a DVC registry yet; pass --remote to create one")
        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "-q", "-b", "main")
        _dvc(repo, "init", "-q")
        _dvc(repo, "remote", "add", "-d", "store", config.remote)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", "Initialise DVC data registry")
    if _git(repo, "tag", "--list", config.tag).strip():
        raise StepError(f"{repo}: tag {config.tag!r} already exists; versions are immutable, pick a new tag")
    target = repo / config.path
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    _dvc(repo, "add", "-q", config.path)
    _dvc(repo, "push", "-q")
    # DVC's .gitignore for the folder lies beside it: at the root for `dog`, in people/ for `people/jane`
    _git(repo, "add", f"{config.path}.dvc", posixpath.join(posixpath.dirname(config.path.strip("/")), ".gitignore"))
    if record is not None:  # beside the photos' .dvc file, in Git: versioned with them, not one of them
        (repo / record_name(config.path)).write_text(record, encoding="utf-8")
        _git(repo, "add", record_name(config.path))
    if _git(repo, "status", "--porcelain", "--untracked-files=no").strip():
        _git(repo, "commit", "-qm", f"Publish {config.path} as {config.tag}")
    _git(repo, "tag", config.tag)
    return {"repo": str(repo), "path": config.path, "tag": config.tag, "commit": _git(repo, "rev-parse", "HEAD").strip(),
            "hash": content_hash(target)}


def reasons(exc: BaseException) -> str:
    """An error and the errors that caused it, first lines joined: scmrepo's "CloneError: SCM error" says why only
    in its cause (the host refused, the repository does not exist, authentication failed)."""
    said, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        line = (str(exc).strip().splitlines() or [""])[0].strip()
        if line and not any(line in s for s in said):
            said.append(f"{type(exc).__name__}: {line}")
        exc = exc.__cause__ or exc.__context__
    return "; ".join(said)[:500] or "unknown error"


TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def check_subject_path(path: str, repo: Path | None = None) -> None:
    """Refuse a subject folder that is the registry itself, lies outside it, or is Git's or DVC's own (publishing
    replaces the folder); given the registry's local path, symbolic links are followed too."""
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        reason = "a control character"
    elif Path(path).is_absolute():
        reason = "an absolute path"
    else:
        relative = posixpath.normpath(path or ".")
        if repo is not None:
            target, root = (repo / path).resolve(), repo.resolve()
            relative = target.relative_to(root).as_posix() if target.is_relative_to(root) else ".."
        if relative == ".":
            reason = "the registry itself"
        elif relative == ".." or relative.startswith("../"):
            reason = "outside the registry"
        elif relative.split("/")[0].startswith((".git", ".dvc")):  # .gitignore, .dvcignore too
            reason = "Git's or DVC's own folder"
        else:
            return
    raise StepError(f"--path {path!r}: {reason}; name a folder inside the registry, e.g. dog")


def _git(repo: Path, *args: str) -> str:
    return _call(["git", "-c", "user.name=Dreamline", "-c", "user.email=dreamline@localhost", *args], repo)


def _dvc(repo: Path, *args: str) -> str:
    return _call([sys.executable, "-m", "dvc", *args], repo)


def _call(argv: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}  # no usage reports from offline machines
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise StepError(redact(f"{cwd}: `{' '.join(argv[-3:])}` failed: {detail[-1] if detail else proc.returncode}"))
    return proc.stdout
