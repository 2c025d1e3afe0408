"""Give every accepted image its training caption.

Strategies: `instance` (the DreamBooth instance prompt for every image, the default) and `sidecar` (kohya's
convention: `photo.txt` or `photo.caption` beside `photo.jpg`), combined through a template such as
`{instance_prompt}, {caption}`. Images whose sidecar is missing or empty fall back to the instance prompt and are
reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sd_tasks.cli import option
from sd_tasks.errors import StepError
from sd_tasks.storage import read_dir, read_json, write_dir, write_json

STRATEGIES = ("instance", "sidecar")


@dataclass
class CaptionConfig:
    """Caption the images accepted by `validate`; write manifest.json."""

    report: str = option("validate's output (URI of the folder holding report.json)")
    output: str = option("URI to write manifest.json to")
    instance_prompt: str = option("the DreamBooth prompt naming the subject, e.g. 'a photo of sks dog'")
    strategy: str = option(f"where captions come from: {' or '.join(STRATEGIES)}", "instance")
    template: str = option("how a sidecar caption combines with the instance prompt", "{instance_prompt}, {caption}")


def run(config: CaptionConfig) -> dict:
    if config.strategy not in STRATEGIES:
        raise StepError(f"--strategy {config.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    report = read_json(f"{config.report}/report.json")
    images = read_dir(report["source"])
    records, missing = [], []
    for item in report["accepted"]:
        caption = config.instance_prompt
        if config.strategy == "sidecar":
            text = sidecar_caption(images / item["path"])
            if text:
                caption = config.template.format(instance_prompt=config.instance_prompt, caption=text)
            else:
                missing.append(item["path"])
        records.append({**item, "caption": caption})
    with write_dir(config.output) as out:
        write_json(out / "manifest.json", {"source": report["source"], "records": records, "missing": missing})
    return {"manifest": f"{config.output}/manifest.json", "captioned": len(records), "missing_captions": missing}


def sidecar_caption(image: Path) -> str:
    for suffix in (".txt", ".caption"):
        side = image.with_suffix(suffix)
        if side.is_file():
            return " ".join(side.read_text(errors="replace").split())
    return ""
