"""Decoder invariants: KV-cache decoding equals the full forward; chunked attention equals dense; bf16 runs close to
fp32; the recipe's forward weight quantization equals kernels quantized offline."""
import jax.numpy as jnp
import numpy as np

from prefixquant_jax.nn.decoder import Decoder, attention
from tests.conftest import rng_tokens


def test_incremental_equals_full(tiny_ck):
    ck = tiny_ck
    m = Decoder(ck.config, ck.params)
    ids = jnp.asarray(rng_tokens(24, ck.config.vocab_size)[None])
    full = m(ids)
    cache = m.init_cache(1, 24)
    assert int(cache.pos) == 0 and cache.rows == 24
    a, cache = m(ids[:, :10], cache)
    parts = [a]
    for t in range(10, 24):
        assert int(cache.pos) == t
        b, cache = m(ids[:, t:t + 1], cache)
        parts.append(b)
    np.testing.assert_allclose(np.concatenate(parts, 1), np.asarray(full), atol=1e-5)


def test_chunked_attention_equals_dense():
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(2, 40, 4, 8)), jnp.float32)
    k = jnp.asarray(r.normal(size=(2, 43, 2, 8)), jnp.float32)
    v = jnp.asarray(r.normal(size=(2, 43, 2, 8)), jnp.float32)
    dense = attention(q, k, v, 3, 2, query_chunk=10_000)
    chunked = attention(q, k, v, 3, 2, query_chunk=8)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(dense), atol=1e-6)
    # numpy reference with explicit GQA and causal mask
    kk, vv = np.repeat(np.asarray(k), 2, 2), np.repeat(np.asarray(v), 2, 2)
    s = np.einsum("blhd,bthd->bhlt", np.asarray(q), kk) / np.sqrt(8)
    s = np.where(np.arange(43)[None] <= (3 + np.arange(40))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhlt,bthd->blhd", p, vv).reshape(2, 40, 32)
    np.testing.assert_allclose(np.asarray(dense), ref, atol=1e-5)


def test_bfloat16_close_to_fp32(tiny_ck):
    ck = tiny_ck
    ids = jnp.asarray(rng_tokens(16, ck.config.vocab_size)[None])
    f32 = Decoder(ck.config, ck.params)(ids)
    b16 = Decoder(ck.config, ck.params, jnp.bfloat16)(ids)
    assert b16.dtype == jnp.float32  # logits always fp32
    assert float(jnp.abs(b16 - f32).max()) < 0.1 * float(jnp.abs(f32).max())


def test_forward_weight_quant_equals_prequantized_kernels(tiny_ck):
    """Scales in qparams[<name>]["scale"] + fake-quant at forward == kernels RTN-quantized offline (clip search alike)."""
    from prefixquant_jax.pipeline.calibrate import CLIP_GRID
    from prefixquant_jax.pipeline.stages import init_weight_scales
    from prefixquant_jax.quant.ops import rtn_weight
    from prefixquant_jax.quant.recipe import QuantRecipe
    from prefixquant_jax.quant.spec import QuantSpec

    ck = tiny_ck
    spec = QuantSpec(bits=4, granularity="channel", symmetric=True)
    live = Decoder(ck.config, ck.params, recipe=QuantRecipe(weight=spec))
    init_weight_scales(live, spec, progress=False)
    pre = {**ck.params, "layers": {i: {**lp, **{g: {n: np.asarray(rtn_weight(jnp.asarray(w), spec, CLIP_GRID))
                                                     for n, w in lp[g].items()} for g in ("attn", "mlp")}}
                                   for i, lp in ck.params["layers"].items()}}
    offline = Decoder(ck.config, pre)
    tokens = jnp.asarray(rng_tokens(16, ck.config.vocab_size)[None])
    a, b = live(tokens), offline(tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)  # same codes; fp32 reassociation only
    assert not np.allclose(np.asarray(a), np.asarray(Decoder(ck.config, ck.params)(tokens)), atol=1e-3)
