"""The reviewer's images of a sweep: labelled image grids and metric plots, logged to the pipeline's MLflow run.

A reviewer uses these to check that the selected checkpoint really looks like the subject, which a thumbnail cannot
show: the grids keep the evaluation images at their own size (the training resolution, 1024 px in production) and
shrink them only past a cap. Per evaluation prompt one grid: a row per learning rate, a column per checkpoint step,
then a row for the current champion and one for the base model. Those two repeat their one image in every column,
so a candidate is compared with both by reading down its column. Every row and column is named and the prompt is
the title, so a grid read on its own (downloaded, pasted into a ticket) still says what it shows. An image that is
not there (its evaluation failed, or a broken checkpoint generated nothing) is a grey tile saying "missing", not a
gap that could pass for a black image.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

from PIL import Image, ImageDraw, ImageFont

from sd_tasks.core.errors import StepError
from sd_tasks.core.storage import is_remote, join, read_bytes
from sd_tasks.evaluation.compare import METRICS

# Past either cap a grid's tiles are downscaled (aspect kept, LANCZOS). 8192 px is about the widest image a
# browser or the MLflow UI shows without trouble and holds 7 checkpoint steps of 1024 px tiles beside the labels.
# 40 Mpx (some 38 tiles of 1024 px, a PNG of roughly 40-80 MB) keeps one grid per prompt a reasonable artifact, and
# stays well under Pillow's decompression-bomb warning (89 Mpx), so a reviewer's own script opens it without fuss.
MAX_GRID_WIDTH = 8192
MAX_GRID_PIXELS = 40_000_000
MIN_TILE = 32  # tiles are never shrunk below this: a grid of hundreds of columns goes over the caps instead
MIN_FONT = 12  # the default font's smallest comfortable size, for the 64 px tiles of the demo and the tests
FONT_PER_TILE = 1 / 16  # label size as a share of the tile's side: 64 px text on 1024 px tiles, seen zoomed out

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MISSING = (160, 160, 160)  # a missing tile's grey, light enough for INK to read on it

Tile = Union[Path, str, Image.Image, None]


@dataclass(frozen=True)
class Layout:
    """Where a grid's parts go: the tiles' size, the label margins (row labels left, title and column labels on top),
    the title's wrapped lines and the label font's size."""

    tile: tuple[int, int]
    rows: int
    columns: int
    left: int
    top: int
    title: tuple[str, ...]
    font_size: int

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.columns * self.tile[0], self.top + self.rows * self.tile[1]

    def corner(self, row: int, column: int) -> tuple[int, int]:
        """Top left pixel of tile (row, column)."""
        return self.left + column * self.tile[0], self.top + row * self.tile[1]


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's scalable built-in font: nothing to install


def plan(tile: tuple[int, int], prompt: str, rows: list[str], columns: list[str]) -> Layout:
    """The layout of a grid of `tile`-sized tiles, its labels sized to the tiles."""
    font_size = max(MIN_FONT, round(min(tile) * FONT_PER_TILE))
    pad = font_size // 2
    font, title_font = _font(font_size), _font(round(font_size * 1.25))
    left = 2 * pad + math.ceil(max((font.getlength(r) for r in rows), default=0))
    width = left + len(columns) * tile[0]
    title = _wrap(prompt, title_font, width - 2 * pad)
    top = pad + len(title) * round(title_font.size * 1.25) + pad + round(font_size * 1.25) + pad
    return Layout(tile, len(rows), len(columns), left, top, tuple(title), font_size)


def fit(native: tuple[int, int], prompt: str, rows: list[str], columns: list[str], max_width: int = MAX_GRID_WIDTH,
        max_pixels: int = MAX_GRID_PIXELS) -> Layout:
    """The layout with the largest tiles up to `native` that keeps the grid within both caps. The labels shrink with
    the tiles, so the fit is found in a few steps rather than solved for."""
    w, h = native
    floor = min(1.0, MIN_TILE / min(w, h))
    scale = 1.0
    while True:
        layout = plan((round(w * scale), round(h * scale)), prompt, rows, columns)
        width, height = layout.size
        over = max(width / max_width, math.sqrt(width * height / max_pixels))
        if over <= 1 or scale <= floor:
            return layout
        scale = max(floor, min(scale / over, scale * 0.99))  # at least 1% a step, so rounding cannot stall it


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """`text` in lines no wider than `width` (a single longer word keeps its own line)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        longer = f"{line} {word}".strip()
        if line and font.getlength(longer) > width:
            lines.append(line)
            line = word
        else:
            line = longer
    return lines + [line] if line else lines or [""]


def _load(tile: Tile) -> Image.Image | None:
    """The tile's image (opened lazily: only its header is read), or None when there is none to show."""
    if isinstance(tile, Image.Image):
        return tile
    if tile is None:
        return None
    try:
        if is_remote(str(tile)):  # one image fetched alone, not its evaluation's folder
            return Image.open(io.BytesIO(read_bytes(str(tile))))
        return Image.open(tile) if Path(tile).is_file() else None
    except (OSError, StepError):  # an unreadable or absent PNG is shown as missing rather than failing every grid
        return None


def grid(tiles: Mapping[tuple[str, str], Tile], prompt: str, rows: list[str], columns: list[str],
         max_width: int = MAX_GRID_WIDTH, max_pixels: int = MAX_GRID_PIXELS) -> Image.Image:
    """A labelled grid: `tiles[(row, column)]` (an image or a PNG's path) at row `row`, column `column`, under the
    title `prompt`. Tiles keep the size of the first one found unless the grid would pass `max_width` or
    `max_pixels`; a tile that is absent, None or not a file is drawn grey and labelled "missing"."""
    layout = fit(_native_size(tiles.values()), prompt, rows, columns, max_width, max_pixels)
    out = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(out)
    font, title_font = _font(layout.font_size), _font(round(layout.font_size * 1.25))
    pad = layout.font_size // 2
    y = pad
    for line in layout.title:
        draw.text((pad, y), line, font=title_font, fill=INK)
        y += round(title_font.size * 1.25)
    tw, th = layout.tile
    for c, column in enumerate(columns):
        x, _ = layout.corner(0, c)
        draw.text((x + tw // 2, layout.top - pad), column, font=font, fill=INK, anchor="md")
    for r, row in enumerate(rows):
        _, y = layout.corner(r, 0)
        draw.text((pad, y + th // 2), row, font=font, fill=INK, anchor="lm")
        for c, column in enumerate(columns):
            x, y = layout.corner(r, c)
            tile = tiles.get((row, column))
            image = _load(tile)
            if image is None:
                draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=MISSING, outline=BACKGROUND)
                draw.text((x + tw // 2, y + th // 2), "missing", font=font, fill=INK, anchor="mm")
                continue
            rgb = image.convert("RGB")  # before resizing: a palette image would be resized by nearest neighbour
            if image is not tile:
                image.close()  # one tile in memory at a time: a big sweep has hundreds of 1024 px images
            if rgb.size != layout.tile:
                rgb = rgb.resize(layout.tile, Image.Resampling.LANCZOS)
            out.paste(rgb, (x, y))
    return out


def _native_size(tiles) -> tuple[int, int]:
    """The size of the first tile there is (all are from one evaluation suite, so all share it)."""
    for tile in tiles:
        if (image := _load(tile)) is not None:
            if image is not tile:
                image.close()
            return image.size
    return 256, 256  # no image at all: every tile is "missing", at a size the labels read well on


def lr_label(lr: float) -> str:
    """'lr 1e-4', 'lr 2.5e-5': learning rates as people write them."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"lr {mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def is_candidate(metrics: dict) -> bool:
    """A checkpoint of this sweep, not the champion being defended nor the base model."""
    return not metrics.get("champion_version") and not metrics.get("base")


def grid_layout(evaluations: dict[str, dict]) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """(row labels, column labels, {(row, column): evaluation folder}) of the review grids: the learning rates in
    increasing order, then the champion, then the base model; the checkpoint steps in increasing order. The champion
    and the base model fill every column of their rows."""
    candidates = {(m["learning_rate"], m["step"]): f for f, m in sorted(evaluations.items()) if is_candidate(m)}
    lrs, steps = sorted({k[0] for k in candidates}), sorted({k[1] for k in candidates})
    rows = [lr_label(lr) for lr in lrs]
    columns = [f"step {step}" for step in steps] or ["image"]
    folders = {(lr_label(lr), f"step {step}"): f for (lr, step), f in candidates.items()}
    specials = [(f"champion v{m['champion_version']}", f) for f, m in sorted(evaluations.items())
                if m.get("champion_version")]
    specials += [("base model", f) for f, m in sorted(evaluations.items())
                 if m.get("base") and not m.get("champion_version")][:1]
    for label, folder in specials:
        rows.append(label)
        folders.update({(label, column): folder for column in columns})
    return rows, columns, folders


def log_review(run_id: str, evaluations: dict[str, dict], rows: list[dict]) -> None:
    """On the parent run: per evaluation prompt a labelled grid of each evaluation's first image for it
    (`review/grid-prompt-NN.png`, see `grid_layout`), what the grids show (`review/grids.txt`), and per metric a plot
    against step with one line per learning rate (`review/<metric>-vs-step.png`, candidates only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sd_tasks.core import tracking

    if not evaluations:
        return
    client = tracking.client()
    row_labels, columns, folders = grid_layout(evaluations)
    prompts = next((m["prompts"] for m in evaluations.values() if is_candidate(m)),
                   next(iter(evaluations.values()))["prompts"])
    for j, prompt in enumerate(prompts):
        tiles = {cell: join(folder, "images", f"p{j:02d}-0.png") for cell, folder in folders.items()}
        client.log_image(run_id, grid(tiles, prompt, row_labels, columns), f"review/grid-prompt-{j:02d}.png")
    client.log_text(run_id, "\n".join(f"prompt-{j:02d}: {p}" for j, p in enumerate(prompts)) +
                    f"\nrows: {', '.join(row_labels)}; columns: {', '.join(columns)}\n"
                    "The champion and the base model repeat their image in every column, to compare down a column. "
                    "A grey 'missing' tile: no image (the evaluation failed or the checkpoint was broken).\n"
                    f"Tiles are at the evaluation resolution, downscaled only where a grid would pass "
                    f"{MAX_GRID_WIDTH} px wide or {MAX_GRID_PIXELS / 1e6:.0f} Mpx.\n", "review/grids.txt")
    plotted = [r for r in rows if r.get("learning_rate") is not None and is_candidate(r)]
    for metric in (*METRICS, "score"):
        if all(r.get(metric) is None for r in plotted):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for lr in sorted({r["learning_rate"] for r in plotted}):
            points = sorted((r["step"], r[metric]) for r in plotted
                            if r["learning_rate"] == lr and r.get(metric) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=lr_label(lr))
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend()
        fig.tight_layout()
        client.log_figure(run_id, fig, f"review/{metric}-vs-step.png")
        plt.close(fig)
