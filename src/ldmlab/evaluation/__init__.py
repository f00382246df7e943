"""Sample-quality evaluation: feature networks (features.py, clip.py) that the metrics run on."""
