"""The quantization pipeline, its stages in order (stages.py), and the block-wise machinery they share: the FP
reference blocks, the block runner, calibration, the trainer and its resumable directory."""
