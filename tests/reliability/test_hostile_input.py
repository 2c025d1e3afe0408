"""Hostile input: damaged images and archives, tampered manifests, template and flag injection, Params of the wrong
type. Every bad input gets one line (`error: <step>: <file or field>: <reason>`, exit 65, no traceback) and changes
nothing: the input folder's files are the same afterwards and no output folder is published."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE, tree_snapshot
from sd_tasks import cli
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import MARKER, _listing, _marker
from sd_tasks.data import caption, resize, validate
from sd_tasks.data.manifest import MAX_CAPTION_CHARS
from sd_tasks.evaluation import evaluate
from test_validate import ACCEPTED, REJECTED, dataset, exact_tree, pattern  # noqa: F401 (a fixture)

pytestmark = pytest.mark.reliability


_defects: set[str] = set()


def defect(figures, scenario: str, outcome: str) -> None:
    """A defect this suite found and the fix it proves, recorded once however many cases show it."""
    if scenario not in _defects:
        _defects.add(scenario)
        figures.record("defect", scenario, outcome, lost=0)


def run_step(capsys, argv: list[str]) -> tuple[int, str]:
    """The step CLI in this process: (exit code, stderr)."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line(err: str, step: str, *fragments: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err[:2000]
    assert err.startswith(f"error: {step}: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err.strip()


# -- images and archives: one representative run through the CLI, as a subprocess -------------------------------

def test_damaged_images_and_archives_through_the_cli(dataset, tmp_path, figures):  # noqa: F811
    members = tmp_path / "members"
    members.mkdir()
    pattern(30).save(members / "x.jpg")
    with zipfile.ZipFile(dataset / "slip.zip", "w") as archive:  # zip slip: members that climb out
        archive.write(members / "x.jpg", "../../escaped.jpg")
        archive.write(members / "x.jpg", "/tmp/absolute.jpg")
    with tarfile.open(dataset / "slip.tar", "w") as archive:  # a symlink member and a `../` member
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        archive.add(members / "x.jpg", "../escaped.jpg")
    rejected = {**REJECTED, "slip.zip": "not an image", "slip.tar": "not an image"}
    before, before_bytes = exact_tree(dataset), tree_snapshot(dataset)
    out = tmp_path / "validated"
    argv = [sys.executable, "-m", "sd_tasks", "validate", "--input", str(dataset), "--output", str(out)]
    done = subprocess.run(argv + ["--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    report = json.loads((out / "report.json").read_text())
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert {r["path"] for r in report["accepted"]} == ACCEPTED and set(reasons) == set(rejected)
    for path, reason in rejected.items():
        assert reasons[path].startswith(reason), (path, reasons[path])
        figures.record("hostile", f"image: {path}", reasons[path], lost=0)
    assert exact_tree(dataset) == before and tree_snapshot(dataset) == before_bytes
    assert not list(tmp_path.rglob("escaped.jpg")) and not Path("/tmp/absolute.jpg").exists()  # nothing extracted

    # too few good files: one line that counts every reason, and no report published
    done = subprocess.run(argv[:-1] + [str(tmp_path / "none"), "--min-images", "99", "--workers", "1"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == cli.EXIT_REFUSED
    line = assert_one_line(done.stderr, "validate", f"{dataset}: 15 usable images, need 99", "4 not an image",
                           "2 too many pixels")
    assert not (tmp_path / "none").exists() and exact_tree(dataset) == before
    figures.record("hostile", "dataset with too few usable images", line, lost=0)


# -- manifests ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> Path:
    """A tiny dataset (with kohya sidecars) through validate, caption (sidecar) and resize: the manifests that
    the next steps read, to be copied and tampered with."""
    root = tmp_path_factory.mktemp("hostile-steps")
    (root / "images").mkdir()
    for i in range(3):
        pattern(40 + i, (96, 80)).save(root / "images" / f"{i}.jpg")
        (root / "images" / f"{i}.txt").write_text(f"on the grass {i}")
    validate.run(validate.ValidateConfig(input=str(root / "images"), output=str(root / "validated"), workers=1))
    caption.run(caption.CaptionConfig(report=str(root / "validated"), output=str(root / "captions"),
                                      instance_prompt="a photo of sks dog", strategy="sidecar"))
    resize.run(resize.ResizeConfig(captions=str(root / "captions"), output=str(root / "resized"), resolution=64))
    return root


def tampered(steps: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of a step's output folder whose manifest `change(data)` edited (its completion marker rewritten to
    match, as a writer would), and a copy of the source images that the manifest now names."""
    for part in ("images", name):
        shutil.copytree(steps / part, tmp_path / part, symlinks=True)
    folder = tmp_path / name
    path = folder / ("report.json" if name == "validated" else "manifest.json")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "source" in data:
        data["source"] = str(tmp_path / "images")
    data = change(data) or data
    path.write_text(json.dumps(data))
    (folder / MARKER).unlink()
    (folder / MARKER).write_text(json.dumps(_marker(_listing(str(folder)))))
    return folder


def first(key: str, field: str, value):
    def change(data):
        data[key][0][field] = value
    return change


def whole(value):
    return lambda data: value


def escape_link(tmp_path: Path) -> str:
    """A symbolic link inside the images folder that points out of it, to a real image."""
    pattern(50).save(tmp_path / "outside.jpg")
    os.symlink(tmp_path / "outside.jpg", tmp_path / "images" / "link.jpg")
    return "link.jpg"


PASSWD = "../" * 32 + "etc/passwd"  # from any folder, up to / and down to a real file
MANIFEST_CASES = [
    # (step, folder it reads, change, what the line names)
    ("caption", "validated", first("accepted", "path", PASSWD), "leaves its folder"),
    ("caption", "validated", first("accepted", "path", "/etc/passwd"), "leaves its folder"),
    ("caption", "validated", first("accepted", "path", "LINK"), "leaves its folder"),
    ("caption", "validated", first("accepted", "path", "0.jpg\x00.txt"), "contains control characters"),
    ("caption", "validated", first("accepted", "path", 7), "a relative path is needed"),
    ("caption", "validated", lambda d: d.update(accepted="0.jpg"), "accepted must be a list"),
    ("caption", "validated", whole([1, 2]), "not a manifest"),
    ("resize", "captions", first("records", "path", PASSWD), "leaves its folder"),
    ("resize", "captions", first("records", "path", "LINK"), "leaves its folder"),
    ("resize", "captions", first("records", "width", 10**9), "is not a size in pixels"),
    ("resize", "captions", first("records", "height", -80), "is not a size in pixels"),
    ("resize", "captions", first("records", "caption", {"text": "x"}), "a caption must be text"),
    ("resize", "captions", lambda d: d.update(records=[["0.jpg"]]), "records[0] must be an object"),
    ("encode", "resized", first("records", "file", PASSWD), "leaves its folder"),
    ("encode", "resized", first("records", "file", "/etc/passwd"), "leaves its folder"),
    ("encode", "resized", first("records", "original_size", [10**9, 10**9]), "original_size: 1000000000 is not a size"),
    ("encode", "resized", first("records", "crop_top_left", [-8, 0]), "crop_top_left: -8 is not a size"),
    ("encode", "resized", first("records", "target_size", [0, 0]), "target_size: 0 is not a size"),
    ("encode", "resized", first("records", "original_size", "80x96"), "two integers are needed"),
    ("encode", "resized", first("records", "crop_top_left", [900, 900]), "leaves the scaled image"),
    ("encode", "resized", first("records", "caption", None), "a caption must be text"),
]


@pytest.mark.parametrize("step, name, change, fragment", MANIFEST_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MANIFEST_CASES)])
def test_a_tampered_manifest_is_refused_in_one_line(steps, tmp_path, capsys, figures, step, name, change, fragment):
    folder = tampered(steps, tmp_path, name, change)
    manifest = folder / ("report.json" if name == "validated" else "manifest.json")
    if '"LINK"' in manifest.read_text():
        manifest.write_text(manifest.read_text().replace('"LINK"', json.dumps(escape_link(tmp_path))))
        (folder / MARKER).write_text(json.dumps(_marker(_listing(str(folder)))))
    before = tree_snapshot(tmp_path)
    out = tmp_path / "out"
    flags = {"caption": ["--report", folder, "--instance-prompt", "a photo of sks dog", "--strategy", "sidecar"],
             "resize": ["--captions", folder, "--resolution", 64],
             # no model is loaded before the manifest is checked: a missing one proves it
             "encode": ["--images", folder, "--base-model", tmp_path / "no-model"]}[step]
    code, err = run_step(capsys, [step, *flags, "--output", out])
    line = assert_one_line(err, step, fragment)
    assert code == cli.EXIT_REFUSED and (str(manifest) in line or str(folder) in line), line
    assert not out.exists() and tree_snapshot(tmp_path) == before
    figures.record("hostile", f"{step} manifest: {fragment}", line, lost=0)
    defect(figures, "manifests were trusted (paths out of their folder, any sizes, any JSON types)",
           "caption, resize, encode and evaluate check every record; one line naming manifest, record and field")


def test_instance_images_of_evaluate_stay_inside_their_folder(steps, tmp_path, figures):
    folder = tampered(steps, tmp_path, "resized", first("records", "file", PASSWD))
    with pytest.raises(StepError, match="leaves its folder"):
        evaluate.load_instance_images(str(folder))
    figures.record("hostile", "evaluate instance-image manifest: ../../etc/passwd", "refused: leaves its folder")


def test_captions_are_plain_text_of_bounded_length(steps, tmp_path, capsys, figures):
    """Control characters, NUL and a 10 MB caption (a sidecar file, or a tampered manifest) become one clean
    line of at most MAX_CAPTION_CHARS characters; nothing is refused, the images go on."""
    shutil.copytree(steps / "images", tmp_path / "images")
    (tmp_path / "images" / "0.txt").write_text("a dog\x00 on\tthe\r\nbeach\x1b[31m\u2028red")
    (tmp_path / "images" / "1.txt").write_text("word " * 2_000_000)  # 10 MB
    before = tree_snapshot(tmp_path / "images")
    validated = tmp_path / "validated"
    validate.run(validate.ValidateConfig(input=str(tmp_path / "images"), output=str(validated), workers=1))
    code, err = run_step(capsys, ["caption", "--report", validated, "--output", tmp_path / "captions",
                                  "--instance-prompt", "a photo of sks dog", "--strategy", "sidecar"])
    assert code == 0, err
    records = json.loads((tmp_path / "captions" / "manifest.json").read_text())["records"]
    captions = [r["caption"] for r in records]
    assert captions[0] == "a photo of sks dog, a dog on the beach [31m red"
    assert len(captions[1]) <= MAX_CAPTION_CHARS and captions[1].startswith("a photo of sks dog, word word")
    assert all(c.isprintable() for text in captions for c in text)
    assert tree_snapshot(tmp_path / "images") == before
    figures.record("hostile", "sidecar caption with NUL, ESC, CR/LF, U+2028",
                   "control characters become spaces", caption=captions[0])
    figures.record("hostile", "sidecar caption of 10 MB", f"cut to {len(captions[1])} characters")
    defect(figures, "captions kept control characters and any length", "cleaned and cut to 4096 characters")

    captions_folder = tampered(steps, tmp_path / "t", "captions", first("records", "caption", "x\x00y\n" * 3_000_000))
    code, err = run_step(capsys, ["resize", "--captions", captions_folder, "--output", tmp_path / "resized",
                                  "--resolution", 64])
    assert code == 0, err
    text = json.loads((tmp_path / "resized" / "manifest.json").read_text())["records"][0]["caption"]
    assert len(text) <= MAX_CAPTION_CHARS and text.startswith("x y x y") and text.isprintable()
    figures.record("hostile", "manifest caption of 12 MB with NUL and newlines",
                   f"resize writes it cleaned, cut to {len(text)} characters")


def encode_cache(folder: Path) -> Path:
    """An encode cache as encode writes it (one shard of real safetensors, its completion markers), small."""
    import torch
    from safetensors.torch import save_file

    from sd_tasks.core.storage import write_dir

    shard = "shard-00000-of-00001"
    with write_dir(str(folder / shard)) as out:
        save_file({"images/00000.png.latent_moments": torch.zeros(8, 8, 8),
                   "images/00000.png.prompt_embeds": torch.zeros(77, 64),
                   "images/00000.png.pooled_prompt_embeds": torch.zeros(32)}, out / "latents.safetensors")
        (out / "records.json").write_text("{}")
    record = {"file": "images/00000.png", "key": "images/00000.png", "shard": shard, "caption": "a photo of sks dog",
              "flipped": False, "original_size": [80, 96], "crop_top_left": [0, 16], "target_size": [64, 64],
              "scaled_size": [64, 96]}
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "scaling_factor": 0.13, "shards": [shard],
                                                      "records": [record]}))
    return folder


def cache_record(field: str, value):
    def change(data):
        data["records"][0][field] = value
    return change


CACHE_CASES = [
    (cache_record("original_size", [10**9, 10**9]), "original_size: 1000000000 is not a size"),
    (cache_record("crop_top_left", [-8, 0]), "crop_top_left: -8 is not a size"),
    (cache_record("target_size", [0, 0]), "target_size: 0 is not a size"),
    (cache_record("shard", "shard-00001-of-00001"), "not one of the cache's shards"),
    (lambda d: d.update(shards=["../../elsewhere"]), "is not a shard name"),
    (lambda d: d.update(scaling_factor=float("nan")), "scaling_factor"),
    (lambda d: d.update(records={"0": 1}), "records must be a list"),
]


@pytest.mark.parametrize("change, fragment", CACHE_CASES, ids=[c[1][:30] for c in CACHE_CASES])
def test_a_tampered_encode_cache_is_refused_by_train(tmp_path, capsys, figures, change, fragment):
    from sd_tasks.training import train

    cache = encode_cache(tmp_path / "cache")
    assert len(train.LatentCache(str(cache)).items) == 1  # the untampered cache is read
    data = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps(change(data) or data))
    before = tree_snapshot(tmp_path)
    out = tmp_path / "train"
    code, err = run_step(capsys, ["train", "--cache", cache, "--output", out, "--base-model", tmp_path / "no-model",
                                  "--mixed-precision", "no"])
    line = assert_one_line(err, "train", str(cache / "manifest.json"), fragment)
    assert code == cli.EXIT_REFUSED and not out.exists() and tree_snapshot(tmp_path) == before
    figures.record("hostile", f"encode cache manifest: {fragment}", line, lost=0)
    defect(figures, "train trusted the encode cache's manifest (shard ../, sizes)", "checked before any model loads")


def test_a_file_name_with_control_characters_is_rejected_and_the_rest_go_on(steps, tmp_path, capsys, figures):
    shutil.copytree(steps / "images", tmp_path / "images")
    pattern(60).save(tmp_path / "images" / "new\nline\x1b.jpg")
    code, err = run_step(capsys, ["validate", "--input", tmp_path / "images", "--output", tmp_path / "v"])
    assert code == 0, err
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    rejected = {r["path"]: r["reason"] for r in report["rejected"]}
    assert rejected["new\nline\x1b.jpg"] == "file name contains control characters" and len(report["accepted"]) == 3
    code, err = run_step(capsys, ["caption", "--report", tmp_path / "v", "--output", tmp_path / "c",
                                  "--instance-prompt", "a photo of sks dog"])
    assert code == 0, err
    assert len(json.loads((tmp_path / "c" / "manifest.json").read_text())["records"]) == 3
    figures.record("hostile", "image file named with a newline and ESC", rejected["new\nline\x1b.jpg"], lost=0)
    defect(figures, "validate accepted file names with control characters", "rejected with a reason; the rest go on")


def test_publish_dataset_never_deletes_outside_its_folder_of_the_registry(tmp_path, capsys, figures):
    """publish-dataset replaces the subject's folder of the registry: a --path of `..`, `.`, an absolute path or
    `.git` would have it delete the registry's history, its parent, or any folder; a --tag that starts with `-` is a
    flag to git. Each is refused in one line before anything is touched."""
    from sd_tasks.data.dataset import PublishConfig, publish

    work = tmp_path / "work"  # what a bad --path could reach: the registry, a neighbour, the photos
    shutil.copytree(SAMPLE, work / "photos")
    publish(PublishConfig(source=str(work / "photos"), repo=str(work / "registry"), path="dog", tag="dog-v1",
                          remote=str(work / "remote")))
    (work / "neighbour").mkdir()
    (work / "neighbour" / "keep.txt").write_text("not the registry's")
    before = tree_snapshot(work)
    config = tmp_path / "publish.json"  # a file, so that a NUL can be passed too
    cases = [(path, "dog-v2") for path in ("..", ".", "", "dog/../..", str(work / "neighbour"), ".git", ".dvc",
                                           "dog\x00")] + [("dog", "--force"), ("dog", "-d")]
    for path, tag in cases:
        config.write_text(json.dumps({"source": str(work / "photos"), "repo": str(work / "registry"), "path": path,
                                      "tag": tag}))
        code, err = run_step(capsys, ["publish-dataset", "--config", config])
        line = assert_one_line(err, "publish-dataset", "--tag" if tag.startswith("-") else "--path")
        assert code == cli.EXIT_REFUSED and tree_snapshot(work) == before, (path, line)
        figures.record("hostile", f"publish-dataset path {path!r} tag {tag!r}", line, lost=0)
    defect(figures, "publish-dataset --path .. / . / '' deleted the registry's parent or the registry",
           "--path must be a folder inside the registry, --tag a tag")

    (tmp_path / "secret.txt").write_text("api key")  # a link in the photos would publish what it points to
    os.symlink(tmp_path / "secret.txt", work / "photos" / "notes.jpg")
    before = tree_snapshot(work)
    code, err = run_step(capsys, ["publish-dataset", "--source", work / "photos", "--repo", work / "registry",
                                  "--path", "dog", "--tag", "dog-v2"])
    line = assert_one_line(err, "publish-dataset", f"{work / 'photos' / 'notes.jpg'}: symbolic link")
    assert code == cli.EXIT_REFUSED and tree_snapshot(work) == before
    figures.record("hostile", "publish-dataset source with a symbolic link out of it", line, lost=0, secrets_found=0)
    defect(figures, "publish-dataset followed symbolic links in the source", "refused, naming the link")


# -- templates and prompts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "{instance_prompt.__class__.__mro__}", "{instance_prompt.__init__.__globals__}", "{0}", "{}",
    "{caption!r:>99999999}", "{caption:>99999999}", "{caption[0]}", "{instance_prompt}, {caption", "{{caption}",
    "{caption}}", "{caption:{instance_prompt}}", "{secret}",
])
def test_a_caption_template_has_only_its_two_fields(steps, tmp_path, capsys, figures, template):
    out = tmp_path / "captions"
    code, err = run_step(capsys, ["caption", "--report", steps / "validated", "--output", out, "--strategy",
                                  "sidecar", "--instance-prompt", "a photo of sks dog", "--template", template])
    line = assert_one_line(err, "caption", "--template", "{instance_prompt} and {caption}")
    assert code == cli.EXIT_REFUSED and not out.exists()
    figures.record("hostile", f"caption template {template}", line)
    defect(figures, "caption --template was str.format with attribute access and format specs",
           "only {instance_prompt} and {caption}; refused in one line")


def test_a_good_template_and_braces_in_captions_are_kept(steps, tmp_path, capsys):
    shutil.copytree(steps / "images", tmp_path / "images")
    (tmp_path / "images" / "0.txt").write_text("{instance_prompt.__class__} {0}")  # a caption is not a template
    validate.run(validate.ValidateConfig(input=str(tmp_path / "images"), output=str(tmp_path / "v"), workers=1))
    code, err = run_step(capsys, ["caption", "--report", tmp_path / "v", "--output", tmp_path / "c", "--strategy",
                                  "sidecar", "--instance-prompt", "sks {dog}", "--template",
                                  "{caption} ({{style}}) {instance_prompt}"])
    assert code == 0, err
    records = json.loads((tmp_path / "c" / "manifest.json").read_text())["records"]
    assert records[0]["caption"] == "{instance_prompt.__class__} {0} ({style}) sks {dog}"


def test_a_prompt_that_looks_like_a_flag_reaches_the_step_as_the_prompt(steps, tmp_path, figures):
    """Through the operator's argv (`--flag=value`) into the real caption step, as a subprocess."""
    from dreamline.operators import step_argv

    hijack = tmp_path / "hijacked"
    prompt = f"--output={hijack}"
    argv = step_argv("caption", {"report": str(steps / "validated"), "output": str(tmp_path / "captions"),
                                 "instance_prompt": prompt, "strategy": "instance"})
    done = subprocess.run([sys.executable, "-m", "sd_tasks", *argv], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    records = json.loads((tmp_path / "captions" / "manifest.json").read_text())["records"]
    assert {r["caption"] for r in records} == {prompt} and not hijack.exists()
    figures.record("hostile", "instance prompt --output=/elsewhere", "stays the prompt; nothing written elsewhere")


# -- the trigger form's Params and the recipe check -------------------------------------------------------------

@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags")).dags["lora_dog"]


def refusal(dag, conf: dict) -> str | None:
    """The line the run gets for this trigger conf: the Params' JSON schema (as the UI and the REST API apply
    it), then the `recipe` task's check; None when both let it through."""
    from airflow.sdk.definitions.param import ParamValidationError

    from dreamline import plan

    try:
        params = copy.deepcopy(dag.params)
        params.update(conf)
        plan.check_recipe(params.validate())
    except (ParamValidationError, plan.RecipeError) as exc:
        return str(exc).splitlines()[0]
    return None


NAN, INF = math.nan, math.inf
PARAM_CASES = [
    {"learning_rates": "1e-4"}, {"learning_rates": ["1e-4"]}, {"max_steps": -1}, {"max_steps": 1e12},
    {"max_steps": "500"}, {"max_steps": 500.0}, {"checkpointing_steps": 100.0}, {"resolution": 1e9},
    {"resolution": 1024.0}, {"seed": 1.0}, {"evaluation_prompts": {"a": "{instance}"}},
    {"learning_rates": [NAN]}, {"learning_rates": [INF]}, {"halving_keep": NAN}, {"prior_loss_weight": INF},
    {"promotion_margin": NAN}, {"promotion_confidence": NAN}, {"weight_accuracy": NAN},
    {"evaluation_prompts": ["a {instance.__init__}"]}, {"evaluation_prompts": ["a {instance} {{"]},
    {"evaluation_prompts": ["a {instance} }"]}, {"evaluation_prompts": ["a {instance!r}"]},
    {"evaluation_prompts": ["a {instance:>99999999}"]}, {"evaluation_prompts": ["a {instance} \x00"]},
    {"instance_prompt": "a photo of sks dog\x00"}, {"instance_prompt": "a\nphoto"},
    {"instance_prompt": "x" * 10_000_000}, {"class_prompt": "\x1b[2J a dog"},
    {"dataset_repo": "x" * 200_000},
]


@pytest.mark.parametrize("conf", PARAM_CASES, ids=[repr(c)[:60] for c in PARAM_CASES])
def test_a_bad_param_is_refused_naming_it(dag, figures, conf):
    [(name, value)] = conf.items()
    line = refusal(dag, conf)
    assert line is not None, f"{name}={value!r} passed the form and the recipe check"
    assert name in line, line
    figures.record("hostile", f"param {name}={repr(value)[:40]}", line[:200])
    if "Invalid input for param" not in line:  # the schema's own refusals were there before
        defect(figures, "the form let NaN, infinity, 500.0 for an integer, control characters and megabytes through",
               "the recipe task refuses them naming the Param")


def test_the_default_form_still_passes(dag):
    assert refusal(dag, {}) is None
    good = {"instance_prompt": "a photo of sks dög, 📷", "evaluation_prompts": ["a {instance} on a {class_noun}"] * 4}
    assert refusal(dag, good) is None


@pytest.mark.parametrize("run_id", [".", "..", "../..", "../lora_backpack", "", ".hidden", "a/../../b"])
def test_a_run_id_names_one_folder_inside_the_dags_own(run_id, figures):
    """A trigger's run id comes from the user (REST API, `airflow dags trigger -r`); Airflow's default
    allowed_run_id_pattern `^[A-Za-z0-9_.~:+-]+$` lets `.` and `..` through. `..` would put the run's folders beside
    the DAG's, `.` into the DAG's own (where writing `dataset/` replaces the run folder of a run named `dataset`)."""
    from dreamline.deployment import DEPLOYMENT

    dag_folder = Path(DEPLOYMENT.storage) / "lora_dog"
    run = Path(DEPLOYMENT.run_dir("lora_dog", run_id))
    assert run.parent == dag_folder and run.name not in ("", ".", "..") and not run.name.startswith("."), run
    assert os.path.normpath(run) == str(run)
    figures.record("hostile", f"run id {run_id!r}", f"run folder {run.name!r} inside the DAG's folder", lost=0)
    defect(figures, "a run id of '.' or '..' made the DAG's folder or its parent the run folder",
           "slug never gives '', '.', '..' or a hidden name")
