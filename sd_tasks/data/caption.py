"""Give every accepted image its training caption.

Strategies: `instance` (the DreamBooth instance prompt for every image, the default), `sidecar` (kohya's
convention: `photo.txt` or `photo.caption` beside `photo.jpg`) and `model` (a captioning model through
transformers, BLIP-class, e.g. Salesforce/blip-image-captioning-large), combined with the instance prompt through a
template such as `{instance_prompt}, {caption}`. Images whose caption is missing or empty fall back to the instance
prompt and are reported; so are those whose sidecar is refused (a link, or outside the image folder: never read;
not text). Sidecars are read in UTF-8 with or without a byte-order mark, UTF-16 and UTF-32 with one, UTF-16 without
one, or Latin-1 as a last resort; any but UTF-8 is said in `caption_notes`.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

from sd_tasks.core.config import option
from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import read_dir, write_dir, write_json
from sd_tasks.data.manifest import MAX_CAPTION_CHARS, caption_text, check_template, inside, load

STRATEGIES = ("instance", "sidecar", "model")


@dataclass
class CaptionConfig:
    """Caption the images accepted by `validate`; write manifest.json."""

    report: str = option("validate's output (URI of the folder holding report.json)")
    output: str = option("URI to write manifest.json to")
    instance_prompt: str = option("the DreamBooth prompt naming the subject, e.g. 'a photo of sks dog'")
    strategy: str = option(f"where captions come from: {' or '.join(STRATEGIES)}", "instance")
    template: str = option("how a found caption combines with the instance prompt", "{instance_prompt}, {caption}")
    caption_model: str = option("captioning model id or folder (strategy model)", "Salesforce/blip-image-captioning-large")
    batch_size: int = option("images per captioning-model batch", 8, at_least=1, at_most=1024)


def run(config: CaptionConfig) -> dict:
    if config.strategy not in STRATEGIES:
        raise StepError(f"--strategy {config.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    check_template(config.template, ("instance_prompt", "caption"), "--template")
    uri = f"{config.report}/report.json"
    report = load(uri, lists=("accepted",), texts=("source",))
    images = read_dir(report["source"])
    paths = [inside(images, item.get("path"), f"{uri}: accepted[{i}].path")
             for i, item in enumerate(report["accepted"])]
    refused: list[str] = []
    notes: list[str] = []  # sidecars read in another encoding than UTF-8
    if config.strategy == "sidecar":
        found = [sidecar_caption(p, images, refused, notes) for p in paths]
    elif config.strategy == "model":
        found = model_captions(paths, config.caption_model, config.batch_size)
    else:
        found = [None] * len(paths)
    records, missing = [], []
    for item, text in zip(report["accepted"], found):
        caption = config.instance_prompt
        if text:
            caption = config.template.format(instance_prompt=config.instance_prompt, caption=text)
        elif text is not None:
            missing.append(item["path"])
        records.append({**item, "caption": caption_text(caption, item["path"])})
    with write_dir(config.output) as out:
        write_json(out / "manifest.json", {"source": report["source"], "records": records, "missing": missing,
                                           "refused_captions": refused, "caption_notes": notes})
    return {"manifest": f"{config.output}/manifest.json", "captioned": len(records), "missing_captions": missing,
            "refused_captions": refused, "caption_notes": notes}


def model_captions(paths: list[Path], model_id: str, batch_size: int) -> list[str]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sd_tasks.data.images import open_rgb
    from sd_tasks.models.loading import device
    from sd_tasks.models.model_refs import local_folder

    model_id = local_folder(model_id, "--caption-model")
    processor = AutoProcessor.from_pretrained(model_id)
    model = AutoModelForImageTextToText.from_pretrained(model_id).to(device()).eval()
    captions = []
    for i in range(0, len(paths), batch_size):
        inputs = processor(images=[open_rgb(p) for p in paths[i:i + batch_size]], return_tensors="pt").to(device())
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=40)
        captions += [" ".join(c.split()) for c in processor.batch_decode(ids, skip_special_tokens=True)]
    return captions


def sidecar_caption(image: Path, folder: Path, refused: list[str], notes: list[str]) -> str | None:
    """The caption beside `image`; None (the instance prompt, unreported) for a sidecar that is refused: a link, or
    one that resolves outside the image folder, could make any file on the worker (a secret) a caption."""
    for suffix in (".txt", ".caption"):
        side = image.with_suffix(suffix)
        name = side.relative_to(folder).as_posix()
        if side.is_symlink():
            refused.append(f"{name}: a symbolic link; not read")
            return None
        if not side.is_file():
            continue
        if not side.resolve().is_relative_to(folder.resolve()):
            refused.append(f"{name}: resolves outside the image folder; not read")
            return None
        try:
            with open(side, "rb") as f:  # only the start: the text encoders read no more
                raw = f.read(MAX_CAPTION_CHARS * 8)
                whole = not f.read(1)
        except OSError as exc:  # no permission, a folder named like a sidecar
            refused.append(f"{name}: cannot be read ({exc.strerror or exc}); not read")
            return None
        text, note = decode_sidecar(raw, whole)
        if text is None:
            refused.append(f"{name}: {note}; not read")
            return None
        if note:
            notes.append(f"{name}: {note}")
        return caption_text(text[:MAX_CAPTION_CHARS * 2], str(side))
    return ""


BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))  # UTF-32 LE's BOM starts UTF-16 LE's


def decode_sidecar(raw: bytes, whole: bool = True) -> tuple[str | None, str | None]:
    """(text, a note on how it was read, or None) of a caption file's first bytes (`whole`: all of them); (None, why)
    when it cannot be text. A byte-order mark decides (UTF-8, UTF-16, UTF-32); without one, UTF-16 when every other byte is NUL, else
    UTF-8, or Latin-1 as a last resort (every byte is some Latin-1 character: said in the note) unless there are NUL
    bytes, which no text in Latin-1 has."""
    for bom, encoding in BOMS:
        if raw.startswith(bom):
            return _decode(raw[len(bom):], encoding, whole), None
    if b"\0" in raw:  # plain-ASCII UTF-16 without a mark: a NUL beside every character
        even, odd = raw[0::2], raw[1::2]
        for encoding, zeros, chars in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
            if zeros and not zeros.strip(b"\0") and b"\0" not in chars:
                return _decode(raw, encoding, whole), f"no byte-order mark; read as {encoding.upper()}"
        try:  # a stray NUL in UTF-8 text: a control character, cleaned like the others (caption_text)
            return _decode(raw, "utf-8", whole, errors="strict"), None
        except UnicodeDecodeError:
            return None, "not text (NUL bytes, and neither UTF-8 nor UTF-16)"
    try:
        return _decode(raw, "utf-8", whole, errors="strict"), None
    except UnicodeDecodeError:
        return _decode(raw, "latin-1", whole), "not UTF-8; read as Latin-1"


def _decode(raw: bytes, encoding: str, whole: bool, errors: str = "replace") -> str:
    """`raw` decoded; when it is not the whole file, a character cut at the end of the read is dropped rather than
    refused."""
    return codecs.getincrementaldecoder(encoding)(errors=errors).decode(raw, final=whole)
