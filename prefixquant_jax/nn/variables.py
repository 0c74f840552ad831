"""The decoder's own variable types besides nnx.Param (the weights): typed so that a filter selects a kind.

QuantParam   quantizer state (scales, zero points): the trainable set of PrefixQuant's fine-tuning; filter by a
             subclass to take one kind alone, e.g. `nnx.split(model, Scale, ...)` for gradients w.r.t. the scales.
Prefix       one layer's FP prefix K or V rows [P, KV, hd] (float32): model state, computed once, never trained
             nor quantized.
"""
from __future__ import annotations

from flax import nnx


class QuantParam(nnx.Variable):
    """Quantizer state: a Scale or a ZeroPoint."""


class Scale(QuantParam):
    """A static quantizer's scale: a site's ([1, 1, 1] per tensor, [KV, 1] per head), a weight's [1, out]."""


class ZeroPoint(QuantParam):
    """A static asymmetric quantizer's zero point (same shape as its scale)."""


class Prefix(nnx.Variable):
    """K or V of the FP prefix tokens for one layer, [P, KV, hd] float32 (K as attention reads it: after RoPE
    and any online rotation of the model it was computed with)."""
