"""Serving: each subject's registered LoRA behind one image API. `champions` follows the registry (which version
serves a subject, downloaded and checked once), `renderer` keeps one warm base model with the adapters swapped in,
`api` is the HTTP interface (FastAPI), `server` the `serve` step that runs it on one machine.

May use: registry, evaluation, training, data, models and the core.
"""
