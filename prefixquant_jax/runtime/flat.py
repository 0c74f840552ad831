"""FlatQuant in the int4 runtime: the online half of a merged FlatQuant model, as packed arrays.

A merged FlatQuant model (flatquant/merge.py) keeps P^-1 and the scales in its kernels, so the runtime's
weights are packed as for PrefixQuant; what stays online, and is reproduced here with the recipe's own
functions (flatquant/recipe.py) so that the integer codes equal the fake-quant model's:

  qkv_in / up_gate_in / down_in   x (P1 kron P2)            (kron_apply: two small matmuls)
  o_in                            heads mixed by P_o, or x (P_o kron P_v) when the KV stays in the
                                  original space (an FP prefix: kv_original_space)
  q, k after RoPE                 k P_k per head; q P_k^-T per head, unless kv_original_space
  k, v after quantization         mapped back by P_k^-1, P_v^-1 per head when kv_original_space (here:
                                  when the cache is read, since the cache holds the codes)
  dynamic sites                   per-token (activations) or per-(token, head) (KV) range shrunk by the
                                  learned LAC factors sigmoid(a_min), sigmoid(a_max) (lac_qparams)

`layer_params(block)` collects, per layer, {name: f32 array}: "qkv_1", "qkv_2", "ug_1", "ug_2",
"down_1", "down_2", "o_1" (forward factors P), "v_1" (kv_original_space only), "k_1", "k_1_inv",
"v_1_inv", and "lac_<site>_min|max" [1] for every site with learned activation clipping.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prefixquant_jax.flatquant.recipe import SITE_TRANSFORM, lac_qparams, lac_quantize, mix_heads, per_head
from prefixquant_jax.flatquant.transforms import factor, kron_apply
from prefixquant_jax.quant.spec import QuantSpec


def layer_params(block, recipe) -> dict:
    """The online transform factors and LAC logits of one merged FlatQuant block (see the module docstring)."""
    t, param = block.transforms, recipe.param
    out = {}
    for key in ("qkv_1", "qkv_2", "ug_1", "ug_2", "down_1", "down_2", "o_1", "k_1", "v_1"):
        if key in t or key + "_base" in t:
            p, p_inv = factor(t, key, param)
            if key in ("k_1", "v_1"):
                out[key + "_inv"] = p_inv
            if key != "v_1" or recipe.kv_original_space:
                out[key] = p
    for key in t:
        if key.startswith("lac_"):
            out[key] = jnp.asarray(t[key][...], jnp.float32)
    return out


def site_input(fp: dict, site: str, x, kv_original_space: bool):
    """The recipe's online transform of activation site `site` applied to x [..., n] (x itself if none)."""
    tn = SITE_TRANSFORM.get(site)
    if tn is not None and tn + "_1" in fp:
        return kron_apply(x, fp[tn + "_1"], fp[tn + "_2"])
    if site == "o_in" and "o_1" in fp:
        po = fp["o_1"]
        if kv_original_space and "v_1" in fp:
            return kron_apply(x, po, fp["v_1"])
        return mix_heads(x, po)
    return x


def kron_pair(fp: dict, site: str, kv_original_space: bool, K: int):
    """site_input as a Kronecker pair (P1, P2), y = x @ kron(P1, P2), for the fused rotate_quant kernel;
    None when the site has no transform. The head mixing of o_in is the pair (P_o, I_hd)."""
    tn = SITE_TRANSFORM.get(site)
    if tn is not None and tn + "_1" in fp:
        return fp[tn + "_1"], fp[tn + "_2"]
    if site == "o_in" and "o_1" in fp:
        po = fp["o_1"]
        if kv_original_space and "v_1" in fp:
            return po, fp["v_1"]
        return po, jnp.eye(K // po.shape[0], dtype=jnp.float32)
    return None


def has_lac(fp: dict, site: str) -> bool:
    return f"lac_{site}_max" in fp


def lac_factors(fp: dict, site: str):
    """(sigmoid(a_min), sigmoid(a_max)) of the site's LAC logits (rotate_quant's `lac`), None without LAC."""
    if not has_lac(fp, site):
        return None
    return jax.nn.sigmoid(fp[f"lac_{site}_min"]), jax.nn.sigmoid(fp[f"lac_{site}_max"])


def lac_act_codes(fp: dict, site: str, x2, bits: int):
    """Symmetric per-token codes int8 [M, K] and scale f32 [M, 1] of x2 [M, K] with the site's LAC factors."""
    spec = QuantSpec(bits=bits, granularity="token", symmetric=True, dynamic=True)
    q = lac_quantize(x2, spec, fp[f"lac_{site}_min"], fp[f"lac_{site}_max"], ste=False)
    return q.qvalue, q.scale


def lac_kv_qparams(fp: dict, site: str, x, bits: int):
    """Asymmetric per-(token, head) (scale, zero), each [B, L, KV], of x [B, L, KV, hd] with LAC factors."""
    spec = QuantSpec(bits=bits, granularity="token", symmetric=False, dynamic=True)
    scale, zero = lac_qparams(x.astype(jnp.float32), spec, fp[f"lac_{site}_min"], fp[f"lac_{site}_max"])
    return scale[..., 0], zero[..., 0]


def qk(fp: dict, q, k, kv_original_space: bool):
    """q, k [B, L, heads, hd] after RoPE -> what attention and the K quantizer see."""
    if "k_1" not in fp:
        return q, k
    if not kv_original_space:
        q = per_head(q, fp["k_1_inv"].T)
    return q, per_head(k, fp["k_1"])


def kv_back(fp: dict, k, v, kv_original_space: bool):
    """Dequantized cache K, V [B, T, KV, hd] mapped back to the original space (kv_original_space only)."""
    if not kv_original_space:
        return k, v
    if "k_1_inv" in fp:
        k = per_head(k, fp["k_1_inv"])
    if "v_1_inv" in fp:
        v = per_head(v, fp["v_1_inv"])
    return k, v
