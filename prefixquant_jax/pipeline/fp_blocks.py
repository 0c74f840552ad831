"""FPBlocks: block l of the FP reference model, built when asked for and not kept (issue [L]: host memory grows
with the block, not the model).

What the block-wise stages read of the FP model is one block at a time: calibration reads it from the quantized
model's own arrays before they are quantized (`FPBlocks.of_model`), training from the checkpoint, its layers read
and rotated one at a time (`FPBlocks(config, params, ...)` over lazy params, rotate.fuse.LazyRotation). Either
way block l sits behind the same FP prefix as the quantized model's.
"""
from __future__ import annotations

import jax.numpy as jnp

from checkpoints_convert.lazy import LazyLayers
from prefixquant_jax.nn.cache import PrefixKV
from prefixquant_jax.nn.decoder import Block, Decoder, block_params


class FPBlocks:
    """`[l]`: FP block l (with `recipe`: the rotated model's online R3/R4, or None) over `params["layers"][l]`
    (a Mapping, possibly lazy), behind `prefix`; `.model()`: the whole FP model (tests, evaluations)."""

    def __init__(self, config, params: dict, recipe=None, prefix: PrefixKV | None = None, dtype=jnp.float32):
        self.config, self.params, self.recipe, self.prefix, self.dtype = config, params, recipe, prefix, dtype

    @classmethod
    def of_model(cls, model: Decoder, recipe=None) -> "FPBlocks":
        """The FP blocks over `model`'s arrays as they are when a block is asked for (valid while that block's
        kernels are still the FP ones: calibration asks for block l before it quantizes q block l)."""
        layers = LazyLayers(len(model.layers), lambda i: block_params(model.layers[i]), keep=False)
        return cls(model.config, {"layers": layers}, recipe, model.prefix_kv, model.dtype)

    def __len__(self) -> int:
        return self.config.num_layers

    def __getitem__(self, layer: int) -> Block:
        prefix = None if self.prefix is None else (self.prefix.k[layer], self.prefix.v[layer])
        return Block(self.config, self.params["layers"][layer], self.dtype, self.recipe, prefix)

    def model(self) -> Decoder:
        return Decoder(self.config, self.params, self.dtype, self.recipe, self.prefix)
