"""QuantizedModel: what `quantize` returns (and `load` gives back)."""
from __future__ import annotations

import dataclasses

from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import Decoder
from prefixquant_jax.quant.qarray import QArray, quantize


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """`model`: the fake-quant Decoder (its blocks' recipe is the quantization, its FP prefix inside); `report`:
    what every stage measured; `fp_blocks`: the FP reference blocks (pipeline.fp_blocks.FPBlocks, built one at a
    time from the checkpoint) for training, None for a loaded model."""

    model: Decoder
    report: dict
    fp_blocks: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def config(self):
        return self.model.config

    @property
    def recipe(self):
        """The quantization (a named QuantRecipe: presets.py) the model runs."""
        return self.model.recipe

    @property
    def prefix_kv(self):
        return self.model.prefix_kv

    @property
    def prefix_len(self) -> int:
        return self.model.prefix_len

    def replace(self, **kw) -> "QuantizedModel":
        return dataclasses.replace(self, **kw)

    def weight(self, layer: int, name: str) -> QArray:
        """The QArray of linear `name` (q k v o gate up down) of block `layer`, as the forward quantizes it;
        UserError when that weight is not quantized."""
        blk = self.model.layers[layer]
        spec = getattr(blk.recipe, "weight", None)
        if spec is None or name not in blk.qparams:
            raise UserError(f"layer {layer} weight {name!r} is not quantized in {self.recipe.name!r}")
        return quantize(blk.linear_module(name).kernel[...], spec.replace(dynamic=False),
                        scale=blk.qparams[name]["scale"][...])
