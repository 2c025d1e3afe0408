"""Reading what one step hands the next (validate's report.json, caption's, resize's and encode's manifest.json),
and the one template a user writes (caption's --template).

A manifest is input like any other (a pod's volume, an S3 prefix, a hand edit), so nothing in it is trusted: every
path must stay inside its folder, every size be a sane number of pixels and every caption be plain text. What is
not is refused in one line naming the manifest, the record and the field; captions are cleaned instead (control
characters become spaces, and the text is cut to far more than the text encoders read), as a caption file or a
captioning model may well hold a stray tab or a whole page.
"""
from __future__ import annotations

import math
import re
import string
from pathlib import Path, PurePosixPath

from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import read_json

MAX_SIDE = 65_535  # pixels: JPEG's and WebP's own limit; validate's pixel limit keeps real photos far below it
# SDXL's CLIP tokenizers read 77 tokens; a token is a word piece of at most a few dozen characters, so a caption cut
# here still holds more than they use, and a 10 MB caption file costs nothing downstream.
MAX_CAPTION_CHARS = 4096
SHARD = re.compile(r"shard-\d{5}-of-\d{5}")  # encode's shard folder names (sd_tasks.data.encode.shard_name)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1 and the Unicode line separators


def load(uri: str, lists: tuple[str, ...] = ("records",), texts: tuple[str, ...] = ()) -> dict:
    """A manifest that is a JSON object whose `lists` are lists of objects and whose `texts` are strings."""
    data = read_json(uri)
    if not isinstance(data, dict):
        raise StepError(f"{uri}: not a manifest (a JSON object is needed, found {type(data).__name__})")
    for key in texts:
        if not isinstance(data.get(key), str) or not data[key]:
            raise StepError(f"{uri}: {key} must be a URI, found {data.get(key)!r}"[:300])
    for key in lists:
        items = data.get(key)
        if not isinstance(items, list):
            raise StepError(f"{uri}: {key} must be a list, found {type(items).__name__}")
        bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
        if bad is not None:
            raise StepError(f"{uri}: {key}[{bad}] must be an object, found {type(items[bad]).__name__}")
    return data


def inside(folder: Path, value, where: str) -> Path:
    """`folder / value` for a relative path that stays inside `folder`, symbolic links resolved."""
    if not isinstance(value, str) or not value:
        raise StepError(f"{where}: a relative path is needed, found {value!r}"[:300])
    if CONTROL.search(value):
        raise StepError(f"{where}: path {value!r} contains control characters"[:300])
    relative = PurePosixPath(value)
    if relative.is_absolute() or ".." in relative.parts:
        raise StepError(f"{where}: path {value!r} leaves its folder {folder}"[:300])
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise StepError(f"{where}: path {value!r} leaves its folder {folder} (a symbolic link)"[:300])
    return path


def side(value, where: str, low: int = 1) -> int:
    """A number of pixels (or an offset, with low 0): an integer from `low` to MAX_SIDE."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_SIDE:
        raise StepError(f"{where}: {value!r} is not a size in pixels ({low} to {MAX_SIDE})"[:300])
    return value


def pair(value, where: str, low: int = 1) -> list[int]:
    """[height, width] or [top, left]: two sane integers."""
    if not isinstance(value, list) or len(value) != 2:
        raise StepError(f"{where}: two integers are needed, found {value!r}"[:300])
    return [side(v, where, low) for v in value]


def caption_text(value, where: str) -> str:
    """A caption as plain text: control characters become spaces, runs of space one, cut to MAX_CAPTION_CHARS."""
    if not isinstance(value, str):
        raise StepError(f"{where}: a caption must be text, found {type(value).__name__}")
    return " ".join(CONTROL.sub(" ", value[:MAX_CAPTION_CHARS * 2]).split())[:MAX_CAPTION_CHARS].rstrip()


def resized_record(record: dict, where: str) -> dict:
    """A record of resize's manifest with its micro-conditioning checked: sizes in range, the crop inside the
    scaled image; the caption cleaned."""
    original = pair(record.get("original_size"), f"{where}: original_size")
    target = pair(record.get("target_size"), f"{where}: target_size")
    top, left = pair(record.get("crop_top_left"), f"{where}: crop_top_left", low=0)
    scaled = record.get("scaled_size")
    if scaled is not None:
        scaled = pair(scaled, f"{where}: scaled_size")
        if top + target[0] > scaled[0] or left + target[1] > scaled[1]:
            raise StepError(f"{where}: crop_top_left {[top, left]} with target_size {target} leaves the scaled "
                            f"image {scaled}")
    return {**record, "original_size": original, "target_size": target, "crop_top_left": [top, left],
            "caption": caption_text(record.get("caption"), f"{where}: caption")}


def load_cache(uri: str) -> dict:
    """An encode cache's manifest.json (what train reads): shards by their own names only, every record in one of
    them, its micro-conditioning sane, a finite scaling factor."""
    manifest_uri = f"{uri}/manifest.json"
    data = load(manifest_uri)
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        raise StepError(f"{manifest_uri}: shards must be a list of shard names, found {shards!r}"[:300])
    for name in shards:
        if not isinstance(name, str) or not SHARD.fullmatch(name):
            raise StepError(f"{manifest_uri}: {name!r} is not a shard name (shard-NNNNN-of-NNNNN)"[:300])
    factor = data.get("scaling_factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise StepError(f"{manifest_uri}: scaling_factor must be a positive number, found {factor!r}"[:300])
    records = []
    for i, record in enumerate(data["records"]):
        where = f"{manifest_uri}: records[{i}]"
        if record.get("shard") not in shards:
            raise StepError(f"{where}: shard {record.get('shard')!r} is not one of the cache's shards"[:300])
        if not isinstance(record.get("key"), str) or CONTROL.search(record["key"]):
            raise StepError(f"{where}: key must be text, found {record.get('key')!r}"[:300])
        records.append(resized_record(record, where))
    return {**data, "records": records}


def check_template(template: str, fields: tuple[str, ...], where: str) -> str:
    """A str.format template whose only replacement fields are `{name}` for `fields`: no attribute or index access
    (`{x.__class__}`), no conversion or format spec (`{x:>99999999}` pads to 100 MB), no positional field. `{{` and
    `}}` stay literal braces."""
    allowed = " and ".join("{" + f + "}" for f in fields)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone brace
        raise StepError(f"{where} {template!r}: {exc}; the only fields are {allowed} ({{{{ and }}}} for braces)"[:300])
    for _, name, spec, conversion in parsed:
        if name is not None and (name not in fields or spec or conversion):
            raise StepError(f"{where} {template!r}: field {{{name}{'!' + conversion if conversion else ''}"
                            f"{':' + spec if spec else ''}}} is not allowed; the only fields are {allowed}"[:300])
    return template
