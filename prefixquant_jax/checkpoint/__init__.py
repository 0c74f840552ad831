"""Checkpoints: FP models in foreign formats and prefix files as this package's types (fp.py, over
checkpoints_convert), this project's saved quantized format (saved.py, codec.py), and exports (export.py)."""
