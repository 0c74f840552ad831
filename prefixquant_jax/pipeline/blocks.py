"""BlockRunner: the jitted functions of one decoder block run on host-held activations.

Every block-by-block stage (calibration, GPTQ, training) feeds blocks [N, L, D] activations kept on the host
between blocks; this class jits the block forward, the statistics captures and the loss once per block structure
(the graphdef is a static argument, so every layer reuses one compilation). The tokens sit at positions P..P+L-1
behind the blocks' own FP prefix (model state, nn/decoder.py); each call starts from an empty cache.

With `mesh` (a (data, model) jax.sharding.Mesh, parallel.sharding.MeshSpec.make) every call puts the block's
weights on it split over `model` (parallel.sharding.block_shardings: attention heads and MLP columns, o and down by
rows) and the activations' rows over `data`; the jitted functions follow their inputs' shardings (XLA inserts the
collectives). Without: one device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.nn.decoder import rope_tables, with_recipe
from prefixquant_jax.parallel.sharding import batch_shardings, block_shardings
from prefixquant_jax.quant.recipe import Capture, pair_ranges, sown_value


def _sown(block, *args) -> dict:
    """Run block(*args) and return what its recipe sowed (nnx.Intermediate), as a pure dict."""
    _, inter = nnx.capture(lambda b, *a: b(*a), nnx.Intermediate)(block, *args)
    return nnx.to_pure_dict(inter)


def block_output(block, x, P: int, cos, sin):
    """The block on x [N, L, D] at positions P.. from a fresh cache of its rows, behind its own prefix."""
    return block(x, block.init_kv(x.shape[0], x.shape[1]), P, cos, sin)[0]


def _sown_with(block, capture, x, P, cos, sin) -> dict:
    b = with_recipe(block, capture)
    return _sown(b, x, b.init_kv(x.shape[0], x.shape[1]), P, cos, sin)


# module-level jits, (graphdef, P) static: one compilation per block structure and shape in the whole process
@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(gd, P, state, x, cos, sin):
    return block_output(nnx.merge(gd, state), x, P, cos, sin)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ranges(gd, P, state, x, cos, sin):  # FP activations, weights as they are
    b = nnx.merge(gd, state)
    return _sown_with(b, Capture(b.recipe.replace(sites=()), ranges=True), x, P, cos, sin)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _grams(gd, P, state, x, cos, sin):
    b = nnx.merge(gd, state)
    return _sown_with(b, Capture(b.recipe, gram=True), x, P, cos, sin)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _qkv(gd, P, state, x, cos, sin):
    b = nnx.merge(gd, state)
    return _sown_with(b, Capture(b.recipe.replace(sites=()), qkv=True), x, P, cos, sin)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss(gd, P, state, x, cos, sin, target):
    y = block_output(nnx.merge(gd, state), x, P, cos, sin)
    return jnp.mean((y.astype(jnp.float32) - target) ** 2)


class BlockRunner:
    """Jitted block forward / statistics captures / loss for tokens of length L behind a P-token prefix."""

    def __init__(self, config, prefix_len: int, L: int, mesh=None):
        self.config, self.mesh, self.P = config, mesh, prefix_len
        self.cos, self.sin = rope_tables(config, prefix_len + jnp.arange(L))

    def split(self, block):
        """(graphdef, state) of `block`, the state on the mesh (split over `model`) when there is one."""
        gd, state = nnx.split(block)
        if self.mesh is not None:
            state = jax.device_put(state, block_shardings(self.mesh, state))
        return gd, state

    def place(self, *arrays):
        """Activations / targets on the device(s): rows over `data` with a mesh, else as jnp arrays."""
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(jax.device_put(a, batch_shardings(self.mesh, a)) for a in arrays)

    def _chunks(self, x, chunk):
        for s in range(0, len(x), chunk):
            yield self.place(x[s:s + chunk])[0]

    def forward(self, block, x: np.ndarray, chunk: int) -> np.ndarray:
        gd, state = self.split(block)
        return np.concatenate([np.asarray(_forward(gd, self.P, state, xb, self.cos, self.sin)) for xb in self._chunks(x, chunk)])

    def _collect(self, fn, block, x: np.ndarray, chunk: int) -> dict:
        """What the jitted capture `fn` sows on every chunk of x, each value concatenated over the samples."""
        gd, state = self.split(block)
        acc: dict = {}
        for xb in self._chunks(x, chunk):
            for k, v in fn(gd, self.P, state, xb, self.cos, self.sin).items():
                acc.setdefault(k, []).append(np.asarray(sown_value(v)))
        return {k: np.concatenate(v) for k, v in acc.items()}

    def ranges(self, block, x: np.ndarray, chunk: int) -> dict:
        """Per-token (min, max) of every quantization site's input, weights as in `block`, activations FP."""
        return pair_ranges(self._collect(_ranges, block, x, chunk))

    def grams(self, block, x: np.ndarray, chunk: int) -> dict:
        """{site: sum over all tokens of x^T x [C, C] (float64)} at each activation site, as `block` runs."""
        gd, state = self.split(block)
        acc: dict = {}
        for xb in self._chunks(x, chunk):
            for k, v in _grams(gd, self.P, state, xb, self.cos, self.sin).items():
                site = k.removesuffix("_gram")
                acc[site] = acc.get(site, 0.0) + np.asarray(sown_value(v), np.float64)
        return acc

    def qkv(self, block, x: np.ndarray, chunk: int) -> dict:
        """{"q_attn", "k_cache_x", "v_cache_x": [N, L, heads, hd]}: the attention's q and the KV sites' inputs
        as `block` runs with FP activations (its weights as they are)."""
        return self._collect(_qkv, block, x, chunk)

    def loss(self, block, x, target) -> float:
        gd, state = self.split(block)
        if self.mesh is not None:
            x, target = self.place(x, target)
        return float(_loss(gd, self.P, state, x, self.cos, self.sin, target))
