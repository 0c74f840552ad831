"""Params whose decoder layers are produced one at a time (issue [L]: host memory grows with the block).

`params["layers"]` may be a `LazyLayers`: {layer index: that layer's params dict}, each built by `load(i)` when
asked for and not kept. A safetensors checkpoint reads its layers this way (checkpoints_convert.hf), the
rotation rotates them this way (rotate.fuse.rotate_lazily); a model built from such params (Llama.from_params)
holds its own copy of each layer and the source never more than the one being built. Everything that reads a
params dict keeps working: indexing, items() / values() (every layer in turn), `{**params}`, and jax.tree_util
(registered below; a tree_map returns plain dicts).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax


class LazyLayers(Mapping):
    """{0..n-1: layer params}, layer i built by `load(i)` when first asked for.

    keep=True (a checkpoint's layers): a layer read is kept, so that the params behave as the dict they stand for
    (an edit to ck.params["layers"][i] is seen by the next reader); `streamed()` is the view that reads a layer
    without keeping it (the one kept, if any), for a pipeline that holds one layer at a time. keep=False: every
    access builds the layer anew (derived layers, e.g. rotated ones)."""

    def __init__(self, n: int, load, keep: bool = True):
        self._n, self._load, self._keep, self._kept = int(n), load, keep, {}

    def _index(self, i) -> int:
        try:
            j = int(i) if not isinstance(i, (bool, str)) else None
        except (TypeError, ValueError):
            j = None
        if j is None or j != i or not 0 <= j < self._n:
            raise KeyError(i)
        return j

    def __getitem__(self, i):
        i = self._index(i)
        if i in self._kept:
            return self._kept[i]
        lp = self._load(i)
        if self._keep:
            self._kept[i] = lp
        return lp

    def peek(self, i):
        """Layer i without keeping it (the kept one when it was read before)."""
        i = self._index(i)
        return self._kept[i] if i in self._kept else self._load(i)

    def streamed(self) -> "LazyLayers":
        return LazyLayers(self._n, self.peek, keep=False)

    def __iter__(self):
        return iter(range(self._n))

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"LazyLayers({self._n} layers, {len(self._kept)} read)"


def streamed(params: dict) -> dict:
    """`params` whose layers, if lazy, are read without being kept (LazyLayers.streamed); others as they are."""
    layers = params.get("layers")
    return {**params, "layers": layers.streamed()} if isinstance(layers, LazyLayers) else params


def materialize(params: dict) -> dict:
    """`params` with every LazyLayers loaded into a plain dict (e.g. before jax.device_put with a shardings tree)."""
    if isinstance(params, LazyLayers):
        return {i: materialize(params[i]) for i in params}
    if isinstance(params, dict):
        return {k: materialize(v) for k, v in params.items()}
    return params


def _flatten_with_keys(layers: LazyLayers):
    return [(jax.tree_util.DictKey(i), layers[i]) for i in range(len(layers))], tuple(range(len(layers)))


def _flatten(layers: LazyLayers):
    return [layers[i] for i in range(len(layers))], tuple(range(len(layers)))


jax.tree_util.register_pytree_with_keys(LazyLayers, _flatten_with_keys, lambda keys, kids: dict(zip(keys, kids)),
                                        _flatten)
