"""An evaluation's record on the training run it scores, in MLflow: the checkpoint as a LoggedModel with its
scores, one row of generated images per prompt, and the prompts."""
from __future__ import annotations

import json
import time

from PIL import Image

from sd_tasks.core import tracking


def log_to_training_run(info: dict, checkpoint: str, prompts: list[str], scores: dict,
                        generated: list[list[Image.Image | None]]) -> None:
    """On the training run, without reopening (and so without changing the status of) it: the checkpoint as an
    MLflow LoggedModel carrying its scores (also the run's stepped `eval/*` metrics), and one image row per prompt."""
    run_id, step = info["run_id"], info["step"]
    tracking.log_checkpoint_model(run_id, step=step, learning_rate=info["learning_rate"], uri=checkpoint,
                                  metrics=scores)
    client = tracking.client()
    if any(all(image is not None for image in images) for images in generated):
        _mark_images_logged(client, run_id)
    for j, images in enumerate(generated):
        if all(image is not None for image in images):
            client.log_image(run_id, image_row(images), key=f"eval/prompt-{j:02d}", step=step)
    client.log_text(run_id, json.dumps(prompts, indent=1), "eval/prompts.json")


def _mark_images_logged(client, run_id: str, tries: int = 3) -> None:
    """Set the tag MLflow's `log_image` sets, before it does. Evaluations of the checkpoints of one training run
    log to that one run, at once when the gpu pool lets them: the first `log_image` of each would insert the tag,
    and with a database store one of them fails on the duplicate key. Once the tag is there, setting it updates it.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES

    for attempt in range(1, tries + 1):
        try:
            client.set_tag(run_id, MLFLOW_LOGGED_IMAGES, True)
            return
        except MlflowException:  # the other evaluation inserted it first: set it again, now an update
            if attempt == tries:
                raise
            time.sleep(attempt)


def image_row(images: list[Image.Image]) -> Image.Image:
    row = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for image in images:
        row.paste(image, (x, 0))
        x += image.width
    return row
