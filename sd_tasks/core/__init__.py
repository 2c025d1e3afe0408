"""The shared core every stage stands on: errors and their exit codes (`errors`), storage by URI, local or S3
(`storage`, `object_store`), a step's settings (`config`), MLflow runs and the registry client (`tracking`), what a
step cost (`cost`) and credentials kept out of everything shown (`redact`).

It imports nothing else of sd_tasks, and no ML library at import time.
"""
