"""The models every stage uses: loading SDXL's parts and pipelines (`loading`), pinning hub ids to commits and
fetching them once (`model_refs`, the `pin-models` step), and random-weight SDXL-architecture models for offline
runs (`tiny_model`, the `tiny-model` step).

May use: the core.
"""
