"""Dreamline's ML library: the steps that turn a folder of photos into an evaluated SDXL DreamBooth-LoRA.

No Airflow here. Each step is `sd_tasks.<module>.run(config) -> dict`, run from the command line as
`python -m sd_tasks <step>` (see `sd_tasks.cli`).
"""
import os

# onnxruntime (1.29 on) starts Microsoft's usage telemetry on Linux and keeps a session file in TMPDIR unless this is
# set before it starts. It runs the screen's detector (sd_tasks.safety.screening), and diffusers imports it whenever
# it looks up a pipeline's component classes: in every process that loads or saves a pipeline. Here, so that every
# way into the library (the step CLI, the server, a Ray replica) sets it first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
