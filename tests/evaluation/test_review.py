"""The review grids: tiles of the right evaluation in the right place, at their own size unless a grid would pass the
caps, named rows and columns, grey "missing" tiles, and the grids logged to a real MLflow run."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sd_tasks.core.storage import whole_folders, write_dir, write_json
from sd_tasks.evaluation import review

PROMPTS = ["a photo of sks dog on the beach", "a painting of sks dog"]
TILE = 64
# evaluations of a small sweep, (learning rate, step) -> colour of its images; (1e-4, 200) generated nothing
SWEEP = {(5e-5, 100): (200, 30, 30), (5e-5, 200): (30, 200, 30), (5e-5, 300): (30, 30, 200),
         (1e-4, 100): (200, 200, 30), (1e-4, 200): None, (1e-4, 300): (30, 200, 200)}
CHAMPION, BASE = (200, 30, 200), (250, 120, 0)


def evaluation(root: Path, name: str, colour, **metrics) -> None:
    """An evaluation folder as evaluate writes it (whole, with its marker): one image per prompt in `colour` (none
    when `colour` is None, as for a broken checkpoint), and metrics.json."""
    with write_dir(str(root / name)) as out:
        (out / "images").mkdir()
        if colour is not None:
            for j in range(len(PROMPTS)):
                Image.new("RGB", (TILE, TILE), colour).save(out / "images" / f"p{j:02d}-0.png")
        write_json(out / "metrics.json", {"learning_rate": None, "step": None, "checkpoint": None,
                                          "champion_version": None, "broken": colour is None, "dino": 0.5,
                                          "clip_i": 0.6, "clip_t": 0.3, "preservation": 0.9, **metrics,
                                          "prompts": PROMPTS})


def sweep(root: Path) -> dict[Path, dict]:
    """The small sweep, the champion (v3) and the base model, read back as select reads them: whole folders only."""
    for (lr, step), colour in SWEEP.items():
        evaluation(root, f"lr{lr:g}-step{step}", colour, learning_rate=lr, step=step, checkpoint=f"ck/{lr}/{step}")
    evaluation(root, "champion", CHAMPION, learning_rate=1e-4, step=400, champion_version=3, checkpoint="models:/3")
    evaluation(root, "base", BASE, base=True)
    return {f: json.loads((f / "metrics.json").read_text()) for f in whole_folders(root)}


def pixel(image: Image.Image, layout: review.Layout, row: int, column: int, at=(0.5, 0.5)) -> tuple:
    x, y = layout.corner(row, column)
    return image.getpixel((x + int(layout.tile[0] * at[0]), y + int(layout.tile[1] * at[1])))


def has_ink(image: Image.Image, box) -> bool:
    """Whether the area holds dark pixels (text: nothing else drawn is dark)."""
    return min(image.crop(box).convert("L").getdata()) < 100


def test_layout_names_rows_and_columns_and_repeats_the_champion_and_base(tmp_path):
    evaluations = sweep(tmp_path)
    rows, columns, folders = review.grid_layout(evaluations)
    assert rows == ["lr 5e-5", "lr 1e-4", "champion v3", "base model"]
    assert columns == ["step 100", "step 200", "step 300"]
    assert folders[("lr 1e-4", "step 300")] == tmp_path / "lr0.0001-step300"
    assert {folders[("champion v3", c)] for c in columns} == {tmp_path / "champion"}
    assert {folders[("base model", c)] for c in columns} == {tmp_path / "base"}
    assert review.lr_label(2.5e-4) == "lr 2.5e-4"


def test_small_sweep_keeps_native_tiles_in_the_right_cells_with_labels(tmp_path):
    rows, columns, folders = review.grid_layout(sweep(tmp_path))
    tiles = {cell: folder / "images" / "p00-0.png" for cell, folder in folders.items()}
    image = review.grid(tiles, PROMPTS[0], rows, columns)

    layout = review.plan((TILE, TILE), PROMPTS[0], rows, columns)
    assert layout.left > 0 and layout.top > 0
    assert image.size == (layout.left + 3 * TILE, layout.top + 4 * TILE)  # label margins + tiles at 64 px
    for r, lr in enumerate([5e-5, 1e-4]):
        for c, step in enumerate([100, 200, 300]):
            if SWEEP[lr, step] is not None:
                assert pixel(image, layout, r, c) == SWEEP[lr, step], (lr, step)
    for c in range(3):
        assert pixel(image, layout, 2, c) == CHAMPION
        assert pixel(image, layout, 3, c) == BASE
    missing = pixel(image, layout, 1, 1, at=(0.25, 0.25))  # (1e-4, 200): beside its centred "missing" label
    assert missing == review.MISSING
    assert has_ink(image, (*layout.corner(1, 1), *layout.corner(2, 2)))  # the label on it

    width, height = image.size
    assert has_ink(image, (0, 0, width, layout.top // 2))  # the title
    assert has_ink(image, (layout.left, layout.top // 2, width, layout.top))  # the column labels
    for r in range(4):  # each row's label, beside its row
        assert has_ink(image, (0, layout.corner(r, 0)[1], layout.left, layout.corner(r + 1, 0)[1]))


def test_big_sweep_is_downscaled_under_the_caps(tmp_path):
    """40 steps x 8 learning rates of 1024 px images, plus the champion and base: far past both caps."""
    lrs = [f"lr {k}e-5" for k in range(1, 9)]
    rows, columns = [*lrs, "champion v3", "base model"], [f"step {100 * s}" for s in range(1, 41)]
    colours = {(lrs[0], columns[0]): (200, 30, 30), (lrs[-1], columns[-1]): (30, 30, 200),
               ("base model", columns[5]): BASE}
    # a few real tiles, the rest missing: a fast test of the same geometry (the first tile sets the native size)
    tiles = {cell: Image.new("RGB", (1024, 1024), colour) for cell, colour in colours.items()}
    image = review.grid(tiles, PROMPTS[0], rows, columns)

    width, height = image.size
    assert width <= review.MAX_GRID_WIDTH and width * height <= review.MAX_GRID_PIXELS
    layout = review.fit((1024, 1024), PROMPTS[0], rows, columns)
    assert image.size == layout.size
    assert review.MIN_TILE <= layout.tile[0] < 1024 and layout.tile[0] == layout.tile[1]  # aspect kept
    assert width > review.MAX_GRID_WIDTH * 0.9  # shrunk to fit the cap, not far past it
    assert all(abs(a - b) <= 2 for a, b in zip(pixel(image, layout, 0, 0), colours[lrs[0], columns[0]]))
    assert all(abs(a - b) <= 2 for a, b in zip(pixel(image, layout, 7, 39), colours[lrs[-1], columns[-1]]))
    assert all(abs(a - b) <= 2 for a, b in zip(pixel(image, layout, 9, 5), BASE))
    assert pixel(image, layout, 8, 0, at=(0.1, 0.1)) == review.MISSING
    assert has_ink(image, (0, *layout.corner(8, 0)[1:], layout.left, layout.corner(9, 0)[1]))  # "champion v3"


def test_labels_grow_with_the_tiles():
    small = review.plan((64, 64), "a prompt", ["lr 1e-4"], ["step 100"])
    large = review.plan((1024, 1024), "a prompt", ["lr 1e-4"], ["step 100"])
    assert small.font_size == review.MIN_FONT and large.font_size == 64
    assert large.left > 4 * small.left and large.top > 4 * small.top


def test_log_review_logs_labelled_grids_to_the_mlflow_run(home, tmp_path):
    from sd_tasks.core import tracking

    evaluations = sweep(tmp_path / "evaluations")
    run_id = tracking.find_or_create_run("review-test", "review-test", "review-test")
    rows = [{**m, "score": 0.5 + 0.001 * (m["step"] or 0)} for m in evaluations.values()]  # base and champion too
    review.log_review(run_id, evaluations, rows)

    client = tracking.client()
    logged = {a.path for a in client.list_artifacts(run_id, "review")}
    assert {"review/grid-prompt-00.png", "review/grid-prompt-01.png", "review/grids.txt",
            "review/dino-vs-step.png", "review/score-vs-step.png"} <= logged
    path = client.download_artifacts(run_id, "review/grid-prompt-00.png", str(tmp_path))
    row_labels, columns, _ = review.grid_layout(evaluations)
    with Image.open(path) as grid:
        assert grid.size == review.plan((TILE, TILE), PROMPTS[0], row_labels, columns).size
    text = Path(client.download_artifacts(run_id, "review/grids.txt", str(tmp_path))).read_text()
    assert f"prompt-01: {PROMPTS[1]}" in text and "lr 5e-5, lr 1e-4, champion v3, base model" in text


def test_tall_sweeps_are_held_to_the_pixel_cap_and_usual_ones_stay_native():
    columns = [f"step {100 * s}" for s in range(1, 7)]
    tall = review.fit((1024, 1024), "a prompt", [f"lr {k}e-5" for k in range(1, 9)] + ["base model"], columns)
    width, height = tall.size
    assert width <= review.MAX_GRID_WIDTH and 0.9 * review.MAX_GRID_PIXELS < width * height <= review.MAX_GRID_PIXELS
    usual = review.fit((1024, 1024), "a prompt", ["lr 5e-5", "lr 1e-4", "lr 2e-4", "champion v3", "base model"],
                       columns[:4])
    assert usual.tile == (1024, 1024)  # 3 learning rates x 4 checkpoints: every pixel the evaluation made
