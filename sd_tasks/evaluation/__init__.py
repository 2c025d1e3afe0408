"""Judging checkpoints: images at fixed seeds (`evaluation_images`) scored with DINO, CLIP-I, CLIP-T and preservation
(`metrics`) by the `evaluate` step, logged to MLflow (`evaluation_log`) with review grids (`review`); scores,
normalised and weighted (`scores`), rank a sweep (`select`) or stop its weaker learning rates early (`halving`);
paired bootstrap comparisons of two models (`compare`).

May use: training, data, safety, models and the core.
"""
