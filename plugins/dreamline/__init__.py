"""Dreamline's Airflow side: run `sd_tasks` steps as local processes or Kubernetes pods with the same argv
(`operators`), where they run and with what (`deployment`, `profiles`), and the trigger form's Params (`params`).

Importing this package never imports torch, diffusers or transformers: DAG files parse in well under a second.
"""
