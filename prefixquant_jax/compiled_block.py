"""CompiledBlock: the jitted functions of a decoder block run on host-held activations, behind the FP prefix KV.

Every block-by-block stage (calibration, GPTQ, training) feeds blocks [N, L, D] activations kept on the
host between blocks; this class jits the block forward, the statistics captures and the loss once per
block structure and builds each layer's prefix cache.

With `mesh` (a (data, model) jax.sharding.Mesh, sharding.MeshSpec.make) every call puts the block's weights on
it split over `model` (sharding.block_shardings: attention heads and MLP columns, o and down by rows) and the
activations' rows over `data` (caches' KV heads over `model`, sharding.batch_shardings); the jitted functions
follow their inputs' shardings (XLA inserts the collectives). Without: one device, as before.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.kv_cache import behind_prefix, prefix_len
from prefixquant_jax.model import rope_tables, with_recipe
from prefixquant_jax.quant.recipe import Capture, pair_ranges, sown_value


def _sown(block, *args) -> dict:
    """Run block(*args) and return what its recipe sowed (nnx.Intermediate), as a pure dict."""
    _, inter = nnx.capture(lambda b, *a: b(*a), nnx.Intermediate)(block, *args)
    return nnx.to_pure_dict(inter)


class CompiledBlock:
    """Jitted block forward / range capture / loss behind the prefix KV of each layer.

    The block's graphdef is a static argument, so each distinct block structure (FP block, quantized
    block with its qparams) compiles once and every layer reuses it.
    """

    def __init__(self, config, prefix_kv, L, mesh=None):
        self.config, self.mesh = config, mesh
        self.P = prefix_len(prefix_kv)
        self.prefix_kv = prefix_kv
        self.cos, self.sin = rope_tables(config, self.P + jnp.arange(L))
        P = self.P

        def fwd(gd, state, x, ck, cv, cos, sin):
            return nnx.merge(gd, state)(x, ck, cv, P, cos, sin)[0]

        def capture(gd, state, x, ck, cv, cos, sin):  # FP activations, weights as they are
            b = nnx.merge(gd, state)
            return _sown(with_recipe(b, Capture(b.recipe.replace(sites=()), ranges=True)), x, ck, cv, P, cos, sin)

        def gram(gd, state, x, ck, cv, cos, sin):
            b = nnx.merge(gd, state)
            return _sown(with_recipe(b, Capture(b.recipe, gram=True)), x, ck, cv, P, cos, sin)

        def loss(gd, state, x, ck, cv, cos, sin, target):
            y = nnx.merge(gd, state)(x, ck, cv, P, cos, sin)[0]
            return jnp.mean((y.astype(jnp.float32) - target) ** 2)

        def qkv(gd, state, x, ck, cv, cos, sin):
            b = nnx.merge(gd, state)
            return _sown(with_recipe(b, Capture(b.recipe.replace(sites=()), qkv=True)), x, ck, cv, P, cos, sin)

        self._qkv = jax.jit(qkv, static_argnums=0)
        self._fwd = jax.jit(fwd, static_argnums=0)
        self._capture = jax.jit(capture, static_argnums=0)
        self._gram = jax.jit(gram, static_argnums=0)
        self._loss = jax.jit(loss, static_argnums=0)

    def cache(self, layer: int, n: int, L: int):
        """Layer `layer`'s (k, v) cache for n samples of L tokens behind the prefix (kv_cache.behind_prefix)."""
        kv, _ = behind_prefix(self.prefix_kv, self.config, n, L, jnp.float32, layers=[layer])
        return kv.k[0], kv.v[0]

    def split(self, block):
        """(graphdef, state) of `block`, the state on the mesh (split over `model`) when there is one."""
        gd, state = nnx.split(block)
        if self.mesh is not None:
            from prefixquant_jax.sharding import block_shardings
            state = jax.device_put(state, block_shardings(self.mesh, state))
        return gd, state

    def place(self, *arrays):
        """Activations / caches / targets on the device(s): rows over `data` with a mesh, else as jnp arrays."""
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        from prefixquant_jax.sharding import batch_shardings
        return tuple(jax.device_put(a, batch_shardings(self.mesh, a)) for a in arrays)

    def _chunks(self, layer, x, chunk):
        for s in range(0, len(x), chunk):
            xb = jnp.asarray(x[s:s + chunk])
            yield self.place(xb, *self.cache(layer, len(xb), xb.shape[1]))

    def forward(self, block, layer, x: np.ndarray, chunk: int) -> np.ndarray:
        gd, state = self.split(block)
        return np.concatenate([np.asarray(self._fwd(gd, state, xb, ck, cv, self.cos, self.sin))
                               for xb, ck, cv in self._chunks(layer, x, chunk)])

    def _collect(self, fn, block, layer, x: np.ndarray, chunk: int) -> dict:
        """What the jitted capture `fn` sows on every chunk of x, each value concatenated over the samples."""
        gd, state = self.split(block)
        acc: dict = {}
        for xb, ck, cv in self._chunks(layer, x, chunk):
            for k, v in fn(gd, state, xb, ck, cv, self.cos, self.sin).items():
                acc.setdefault(k, []).append(np.asarray(sown_value(v)))
        return {k: np.concatenate(v) for k, v in acc.items()}

    def ranges(self, block, layer, x: np.ndarray, chunk: int) -> dict:
        """Per-token (min, max) of every quantization site's input, weights as in `block`, acts FP."""
        return pair_ranges(self._collect(self._capture, block, layer, x, chunk))

    def grams(self, block, layer, x: np.ndarray, chunk: int) -> dict:
        """{site: sum over all tokens of x^T x [C, C] (float64)} at each activation site, as `block` runs."""
        gd, state = self.split(block)
        acc: dict = {}
        for xb, ck, cv in self._chunks(layer, x, chunk):
            for k, v in self._gram(gd, state, xb, ck, cv, self.cos, self.sin).items():
                site = k.removesuffix("_gram")
                acc[site] = acc.get(site, 0.0) + np.asarray(sown_value(v), np.float64)
        return acc

    def qkv(self, block, layer, x: np.ndarray, chunk: int) -> dict:
        """{"q_attn", "k_cache_x", "v_cache_x": [N, L, heads, hd]}: the attention's q and the KV sites' inputs
        as `block` runs with FP activations (its weights as they are)."""
        return self._collect(self._qkv, block, layer, x, chunk)

    def prefix_keys(self, layer: int):
        """The layer's FP prefix keys [P, KV, hd] (None without a prefix)."""
        return None if self.prefix_kv is None else jnp.asarray(self.prefix_kv.k[layer])[0, :self.P]

    def loss(self, block, x, ck, cv, target) -> float:
        gd, state = self.split(block)
        if self.mesh is not None:
            x, ck, cv, target = self.place(x, ck, cv, target)
        return float(self._loss(gd, state, x, ck, cv, self.cos, self.sin, target))
