"""What each image holds, checked without building it: each installs only its part of the requirements with
constraints.txt, before its code; the airflow image's packages alone parse the DAG and build its pods, the worker's
hold every library the steps import; the build context holds only what the images copy; and the worker's steps run
with a read-only root filesystem."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO
from dockerfile_stages import CODE_DIRS, ML_STACK, STAGES, TARGETS, chain, env_of, instructions


def requirement_files(text: str) -> list[str]:
    """The files named by -r/--requirement, comments aside."""
    uncommented = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in text.splitlines())
    return re.findall(r"(?:-r|--requirement)\s+(\S+)", uncommented)


def pip_installs(target: str) -> list[str]:
    return [i.value[0] for i in instructions(target, "RUN") if "pip install" in i.value[0]]


@pytest.mark.parametrize("target", TARGETS)
def test_each_image_installs_its_own_requirements_with_the_one_constraints_file(target):
    installs = pip_installs(target)
    assert installs
    files = [f for run in installs for f in requirement_files(run) if f != "/dev/stdin"]
    own = [["requirements", f"{target}.txt"]] + ([["requirements", "no-deps.txt"]] if target == "worker" else [])
    assert [Path(f).as_posix().split("/")[-2:] for f in files] == own
    if target == "worker":  # its declared dependencies replaced (requirements/no-deps.txt says which and why)
        assert re.search(r"pip install [^&]*--no-deps -r \S*requirements/no-deps\.txt", installs[-1]), installs[-1]
    for run in installs:
        if "torch==" in run or "/dev/stdin" in run:
            continue  # torch alone from PyTorch's index, its pin read from constraints.txt
        assert re.search(r"-c \S*constraints\.txt", run), run
    code = {src for i in instructions(target, "COPY") if not i.flags for src in i.value[:-1]} & set(CODE_DIRS)
    assert code == {"airflow": {"dags/", "plugins/"}, "mlflow": set(), "worker": {"sd_tasks/"}}[target]


def test_the_worker_takes_torchs_version_from_constraints():
    run = next(r for r in pip_installs("worker") if "/dev/stdin" in r)
    pattern = re.search(r"grep -Ex '([^']+)' constraints.txt", run)[1]
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if re.fullmatch(pattern, line)]
    assert pins == ["torch==2.13.0"]
    assert '--index-url "${TORCH_INDEX_URL}"' in run


@pytest.mark.parametrize("target", TARGETS)
def test_dependencies_are_installed_before_the_code_is_copied(target):
    steps = chain(target)
    last_install = max(n for n, i in enumerate(steps) if i.cmd == "RUN" and "pip install" in i.value[0])
    code = [n for n, i in enumerate(steps) if i.cmd == "COPY" and any(v in CODE_DIRS for v in i.value[:-1])]
    assert all(n > last_install for n in code)
    # and the build argument that changes with every commit comes after both, so it invalidates no layer
    arg = next(n for n, i in enumerate(steps) if i.cmd == "ARG" and i.value[0] == "DREAMLINE_CODE_VERSION")
    assert arg > max(code + [last_install])


def requirements_in(path: Path) -> list[Requirement]:
    """The requirements of a file, following -r includes."""
    found = []
    for line in path.read_text().splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        if line.startswith("-r"):
            found += requirements_in(path.parent / line.split()[1])
        else:
            found.append(Requirement(line))
    return found


def test_requirements_txt_is_the_union_of_the_images_parts_and_all_are_pinned():
    text = (REPO / "requirements.txt").read_text()
    assert sorted(requirement_files(text)) == [f"requirements/{t}.txt" for t in sorted(TARGETS)]
    pins = {canonicalize_name(line.split("==")[0]): line.split("==")[1]
            for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    for requirement in requirements_in(REPO / "requirements.txt"):
        assert canonicalize_name(requirement.name) in pins, f"{requirement.name} has no pin in constraints.txt"


def closure(names: list[Requirement]) -> set[str]:
    """The installed distributions a set of requirements pulls in (markers evaluated, requested extras only)."""
    seen, todo = set(), [(r, tuple(r.extras)) for r in names]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen and not extras:
            continue
        seen.add(name)
        for line in metadata.requires(requirement.name) or []:
            dependency = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if dependency.marker is None or any(dependency.marker.evaluate(e) for e in environments):
                todo.append((dependency, tuple(dependency.extras)))
    return seen


@pytest.fixture(scope="module")
def airflow_packages() -> set[str]:
    return closure(requirements_in(REPO / "requirements" / "airflow.txt"))


def test_the_airflow_image_leaves_out_the_ml_stack(airflow_packages):
    assert {"apache-airflow", "apache-airflow-providers-cncf-kubernetes", "kubernetes", "psycopg2-binary",
            "apache-airflow-providers-fab"} <= airflow_packages
    assert airflow_packages & ML_STACK == set()
    worker = closure(requirements_in(REPO / "requirements" / "worker.txt"))
    assert ML_STACK <= worker and not any(p.startswith("apache-airflow") for p in worker)


def imported_modules(folder: Path) -> dict[str, str]:
    """{top-level module: a file importing it} of every import in `folder`'s Python files, inside functions too (the
    steps import their heavy libraries lazily), except the standard library and the package itself."""
    import ast

    found = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top != folder.name:
                    found.setdefault(top, path.relative_to(REPO).as_posix())
    return found


def test_the_worker_image_has_every_library_the_steps_import():
    """An option whose library the worker image lacks fails on the GPU, hours into a night (8-bit AdamW's
    bitsandbytes once): every module sd_tasks imports comes from a distribution the worker image installs."""
    worker = closure(requirements_in(REPO / "requirements" / "worker.txt")) | {
        canonicalize_name(r.name) for r in requirements_in(REPO / "requirements" / "no-deps.txt")}
    provided = {module for module, distributions in metadata.packages_distributions().items()
                if {canonicalize_name(d) for d in distributions} & worker}
    missing = {m: where for m, where in imported_modules(REPO / "sd_tasks").items() if m not in provided}
    assert missing == {}, missing


# Parse the DAG in a process where only the airflow image's packages (and the standard library) can be imported:
# every other top-level module of this venv raises ModuleNotFoundError, as it would in that image.
ONLY_AIRFLOW_IMAGE_PACKAGES = """
import importlib.abc, json, sys
blocked = set(json.loads(sys.argv[2]))
before = set(sys.modules)  # what the interpreter's startup (.pth files) loaded

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the airflow image)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("lora_dog")
pod = dag.task_dict["validate"].build_pod_request_obj(dry_run=True) if dag else None
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dags),
                  "image": pod.spec.containers[0].image if pod else None,
                  "blocked_loaded": sorted(m for m in set(sys.modules) - before if m.partition(".")[0] in blocked)}))
"""


def blocked_modules(allowed: set[str]) -> list[str]:
    """Top-level modules of installed distributions outside `allowed`."""
    blocked = set()
    for module, distributions in metadata.packages_distributions().items():
        if not {canonicalize_name(d) for d in distributions} & allowed and module not in sys.stdlib_module_names:
            blocked.add(module)
    return sorted(blocked)


def parse_dag_with_only(allowed: set[str], tmp_path) -> dict:
    from test_dag import kubernetes_settings

    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env = {**environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
           "DREAMLINE_HOME": str(tmp_path / "home"), **kubernetes_settings(),  # a deployment Deployment.check accepts
           "DREAMLINE_IMAGE": "registry.example.com/dreamline/worker:test"}
    proc = subprocess.run([sys.executable, "-c", ONLY_AIRFLOW_IMAGE_PACKAGES, str(REPO / "dags"),
                           json.dumps(blocked_modules(allowed))], capture_output=True, text=True, env=env,
                          cwd=tmp_path)  # outside the repo: sd_tasks is not importable, as in the image
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_dag_parses_and_builds_pods_with_only_the_airflow_images_packages(airflow_packages, tmp_path):
    blocked = blocked_modules(airflow_packages)
    assert {"torch", "diffusers", "mlflow", "dvc"} <= set(blocked)  # the blocker would catch the ML stack
    out = parse_dag_with_only(airflow_packages, tmp_path)
    assert out == {"errors": {}, "dags": ["batch_images", "lora_backpack", "lora_dog"],
                   "image": "registry.example.com/dreamline/worker:test", "blocked_loaded": []}


def test_the_airflow_package_check_fails_when_a_needed_package_is_missing(airflow_packages, tmp_path):
    # Without the Kubernetes client in the allowed set, the same parse reports the DAG's import error.
    out = parse_dag_with_only(airflow_packages - {"kubernetes"}, tmp_path)
    assert out["dags"] == [] and "not in the airflow image" in " ".join(out["errors"].values())


def build_context(root: Path) -> set[str]:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return set(exclude_paths(str(root), patterns))


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else(tmp_path):
    tree = ["Dockerfile", ".dockerignore", "constraints.txt", "requirements.txt", "requirements/worker.txt",
            "sd_tasks/cli.py", "sd_tasks/__pycache__/cli.cpython-311.pyc", "dags/dag.py", "plugins/dreamline/x.py",
            ".git/HEAD", ".env", ".env.example", ".venv/bin/python", ".dreamline/mlflow/mlflow.db",
            ".stack/state", ".pytest_cache/v", "tests/test_x.py", "docs/x.md", "sample_data/dog/00.jpg",
            "bench/prep.py", "scripts/demo.py", "docker-compose.yaml", ".dvc/config", "kubeconfig"]
    for name in tree:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    files = {p for p in build_context(tmp_path) if (tmp_path / p).is_file()}
    assert files == {"Dockerfile", ".dockerignore", "constraints.txt", "requirements/worker.txt",
                     "sd_tasks/cli.py", "dags/dag.py", "plugins/dreamline/x.py"}


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    context = build_context(REPO)
    sources = [src for stage in STAGES.values() for i in stage.instructions
               if i.cmd == "COPY" and not any(f.startswith("--from") for f in i.flags) for src in i.value[:-1]]
    assert sources
    for src in sources:
        path = src.rstrip("/")
        assert (REPO / path).exists() and path in context, src
        if (REPO / path).is_dir():
            tracked = subprocess.run(["git", "ls-files", path], cwd=REPO, capture_output=True, text=True)
            assert set(tracked.stdout.split()) <= context, f"tracked files of {src} left out of the context"


# ---------------------------------------------------------------------------------------------------------------
# The worker with a read-only root filesystem, as its pods run: only /tmp (an emptyDir; HOME and TMPDIR) and
# HF_HOME (a volume) are writable. A user and mount namespace remounts / read-only around the real steps, and the
# checkout too (a CI clone may lie under /tmp), as the image's code is.
SANDBOX = (f"mount --bind /tmp /tmp && mount -o remount,ro,bind / && mount --bind '{REPO}' '{REPO}' && "
           f"mount -o remount,ro,bind '{REPO}' && exec \"$@\"")


def sandbox_available() -> bool:
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", SANDBOX, "sh", "true"], capture_output=True)
    return shutil.which("unshare") is not None and probe.returncode == 0


def run_read_only(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", SANDBOX, "sh", *argv], env=env, capture_output=True,
                          text=True, cwd="/tmp")


@pytest.fixture
def worker_env(tmp_path) -> dict:
    """The worker image's environment (its ENV lines) plus what the pod spec sets; code from this checkout."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": "/tmp",
           "HF_HOME": str(tmp_path / "models" / "huggingface"), "HF_HUB_OFFLINE": "1",
           "DREAMLINE_HOME": str(tmp_path / "home")}
    image_env = {k: v for k, v in env_of("worker").items() if k != "DREAMLINE_CODE_VERSION"}
    assert image_env["HOME"] == "/tmp" and image_env["PYTHONDONTWRITEBYTECODE"] == "1"
    return {**env, **image_env, "PYTHONPATH": str(REPO), "DREAMLINE_CODE_VERSION": "0123abc"}


@pytest.mark.skipif(not sandbox_available(), reason="unshare cannot make a read-only root here")
def test_worker_steps_run_with_a_read_only_root_filesystem(worker_env, registry, prepared, models, tmp_path):
    probe = run_read_only(["touch", str(REPO / ".read-only-probe")], worker_env)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr  # the sandbox holds
    step = [sys.executable, "-m", "sd_tasks"]

    dataset = run_read_only([*step, "dataset", "--repo", str(registry), "--path", "dog", "--rev", "dog-v1",
                             "--output", str(tmp_path / "dataset")], worker_env)
    assert dataset.returncode == 0, dataset.stderr[-3000:]
    encoded = run_read_only([*step, "encode", "--images", str(prepared / "resized"), "--output",
                             str(tmp_path / "cache"), "--base-model", models["sdxl"]], worker_env)
    assert encoded.returncode == 0, encoded.stderr[-3000:]
    cache = json.loads(encoded.stdout.strip().splitlines()[-1])["cache"]
    trained = run_read_only([*step, "train", "--cache", cache, "--output", str(tmp_path / "train"),
                             "--base-model", models["sdxl"], "--max-steps", "2", "--checkpointing-steps", "2",
                             "--experiment", "read-only"], worker_env)
    assert trained.returncode == 0, trained.stderr[-3000:]


@pytest.mark.skipif(not sandbox_available(), reason="unshare cannot make a read-only root here")
def test_without_the_images_dvc_setting_the_dataset_step_fails_read_only(worker_env, registry, tmp_path):
    # What the worker's DVC_SITE_CACHE_DIR is for: DVC's default state folder is /var/tmp/dvc.
    env = {k: v for k, v in worker_env.items() if k != "DVC_SITE_CACHE_DIR"}
    proc = run_read_only([sys.executable, "-m", "sd_tasks", "dataset", "--repo", str(registry), "--path", "dog",
                          "--rev", "dog-v1", "--output", str(tmp_path / "dataset")], env)
    assert proc.returncode != 0 and "error: dataset:" in proc.stderr
