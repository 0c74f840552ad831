"""FlatQuant (arXiv 2410.09426): learnable Kronecker affine transforms, per-channel scales, LWC/LAC; trained by the
block-wise trainer and merged into the weights (the pipeline stage: pipeline/flatquant.py)."""
