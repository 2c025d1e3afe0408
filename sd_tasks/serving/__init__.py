"""Serving: each subject's registered LoRA behind one image API. `champions` follows the registry (which version
serves a subject, downloaded and checked once), `renderer` keeps one warm base model with the adapters swapped in,
`api` is the HTTP interface (FastAPI), `server` the `serve` step that runs it on one machine, `ray_app` the same app
on Ray Serve (replicas multiplexed by adapter), `batch` the steps of the batch_images DAG (a prompt list x seeds
rendered with one version, one MLflow grid).

May use: registry, evaluation, training, data, safety, models and the core.
"""
