"""Model invariants: KV-cache decoding equals the full forward; offsets; bf16 runs close to fp32."""
import jax.numpy as jnp
import numpy as np

from checkpoints_convert import load_checkpoint
from prefixquant_jax.kv_cache import KVCache
from prefixquant_jax.model import Llama, attention
from tests.conftest import rng_tokens


def test_incremental_equals_full(tiny_dir):
    ck = load_checkpoint(tiny_dir)
    m = Llama.from_params(ck.config, ck.params)
    ids = jnp.asarray(rng_tokens(24, ck.config.vocab_size)[None])
    full, _ = m(ids)
    cache = KVCache.empty(ck.config, 1, 24)
    a, cache = m(ids[:, :10], cache, 0)
    parts = [a]
    for t in range(10, 24):
        b, cache = m(ids[:, t:t + 1], cache, t)
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


def test_bfloat16_close_to_fp32(tiny_dir):
    ck = load_checkpoint(tiny_dir)
    ids = jnp.asarray(rng_tokens(16, ck.config.vocab_size)[None])
    f32, _ = Llama.from_params(ck.config, ck.params)(ids)
    b16, _ = Llama.from_params(ck.config, ck.params, jnp.bfloat16)(ids)
    assert b16.dtype == jnp.float32  # logits always fp32
    assert float(jnp.abs(b16 - f32).max()) < 0.1 * float(jnp.abs(f32).max())


def test_forward_weight_quant_equals_prequantized_kernels(tiny_dir):
    """Scales in qparams[<name>]["scale"] + fake-quant at forward == kernels RTN-quantized offline (clip search alike)."""
    from prefixquant_jax.quant.ops import rtn_weight as quantize_weight
    from prefixquant_jax.quant.recipe import QuantRecipe
    from prefixquant_jax.quant.spec import QuantSpec
    from prefixquant_jax.pipeline import WEIGHT_CLIP_GRID, init_weight_scales

    ck = load_checkpoint(tiny_dir)
    spec = QuantSpec(bits=4, granularity="channel", symmetric=True)
    live = Llama.from_params(ck.config, ck.params, recipe=QuantRecipe(weight=spec))
    init_weight_scales(live, spec, progress=False)
    pre = {**ck.params, "layers": {i: {**lp, **{g: {n: np.asarray(quantize_weight(jnp.asarray(w), spec, WEIGHT_CLIP_GRID))
                                                     for n, w in lp[g].items()} for g in ("attn", "mlp")}}
                                   for i, lp in ck.params["layers"].items()}}
    offline = Llama.from_params(ck.config, pre)
    tokens = jnp.asarray(rng_tokens(16, ck.config.vocab_size)[None])
    a, b = live(tokens)[0], offline(tokens)[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)  # same codes; fp32 reassociation only
    assert not np.allclose(np.asarray(a), np.asarray(Llama.from_params(ck.config, ck.params)(tokens)[0]), atol=1e-3)
