"""Data preparation: a dataset version from the DVC data registry (`dataset`, also `publish-dataset`), checked
(`validate`), captioned (`caption`), resized to SDXL's buckets (`resize`), encoded into the latent and text cache
(`encode`, `merge-cache`), and class images for prior preservation (`class_images`); the image, PNG and manifest
helpers they share (`images`, `png`, `manifest`).

May use: safety, models and the core.
"""
