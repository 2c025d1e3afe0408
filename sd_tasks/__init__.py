"""Dreamline's ML library: the steps that turn a folder of photos into an evaluated SDXL DreamBooth-LoRA.

No Airflow here. Each step is `sd_tasks.<module>.run(config) -> dict`, run from the command line as
`python -m sd_tasks <step>` (see `sd_tasks.cli`).
"""
