"""The runtime's GEMM backend switch (RuntimeRecipe.kernels, runtime.pack(kernels=...), --kernels): Mosaic GPU
or Triton.

The runtime's int_gemm gives the same numbers through the Mosaic GEMMs (GPU interpret mode here),
the Triton GEMMs (interpret mode) and the jnp references (backend "xla").
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import pack_int4
from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.qarray import QArray
from prefixquant_jax import presets
from prefixquant_jax.nn.cache import PrefixKV
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import WEIGHT_NAMES, Decoder
from prefixquant_jax.pipeline.result import QuantizedModel
from prefixquant_jax.runtime import kernel_choice
from prefixquant_jax.runtime.cache import cache_rows
from prefixquant_jax.runtime.gemm import codes_qarray, int_gemm
from prefixquant_jax.runtime.pack import pack
from tests.pallas_kernels.test_mgpu_lowering import lower_cuda


def test_use_mosaic():
    assert not kernel_choice.hopper_gpu()  # this CPU
    assert not kernel_choice.use_mosaic("auto", None)  # interpret mode: Triton
    assert kernel_choice.use_mosaic("mosaic", None) and not kernel_choice.use_mosaic("triton", False)
    with pytest.raises(ValueError):
        kernel_choice.use_mosaic("cuda", None)
    with pytest.raises(UserError):
        pack(None, kernels="cuda")  # refused before the model is looked at


def test_auto_picks_mosaic_on_hopper(monkeypatch):
    monkeypatch.setattr(kernel_choice, "hopper_gpu", lambda: True)
    assert kernel_choice.use_mosaic("auto", False)
    assert not kernel_choice.use_mosaic("auto", True)  # never the slow GPU interpreter by default
    assert kernel_choice.gemm_kernel(4, "auto", False).func is kernel_choice.w4a4_matmul_mgpu
    monkeypatch.setattr(kernel_choice, "hopper_gpu", lambda: False)  # e.g. an A100: no wgmma
    assert kernel_choice.gemm_kernel(8, "auto", False).func is kernel_choice.w4a8_matmul


def _qarray(codes, scale):
    """A 4-bit weight QArray as the runtime stores it (codes packed along `in`)."""
    return QArray(qvalue=pack_int4(codes, axis=0), scale=jnp.asarray(scale), zero_point=None, bits=4,
                  granularity="channel", packed_axis=0)


@pytest.mark.parametrize("a_bits", [4, 8])
def test_int_gemm_same_on_both_backends(a_bits):
    rng = np.random.default_rng(a_bits)
    M, K, N = 5, 128, 40
    hi = 8 if a_bits == 4 else 128
    qx = rng.integers(-hi, hi, (M, K))
    codes = pack_int4(qx, axis=-1) if a_bits == 4 else jnp.asarray(qx, jnp.int8)
    xs = rng.uniform(0.01, 0.1, (M, 1)).astype(np.float32)
    x = codes_qarray(codes, jnp.asarray(xs), a_bits)
    w = _qarray(rng.integers(-8, 8, (K, N)), rng.uniform(0.01, 0.1, (1, N)).astype(np.float32))
    out = {k: np.asarray(int_gemm(x, w, "kernels", jnp.float32, True, k)) for k in ("mosaic", "triton")}
    ref = np.asarray(int_gemm(x, w, "xla", jnp.float32))
    np.testing.assert_array_equal(out["mosaic"], ref)
    np.testing.assert_array_equal(out["triton"], ref)


LLAMA3_8B_LAYER = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32,
                              num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192)


def abstract_packed_model(config, P: int, a_bits: int, dynamic: bool):
    """The packed bf16 model (runtime.pack, backend "kernels", kernels "mosaic", compiled: interpret=False) of a
    W4 A`a_bits` (static per tensor, or dynamic per token) KV4 (static per head) rotated recipe behind a P-token
    FP prefix, as shapes only (nnx.eval_shape: no weight is allocated)."""
    d = dataclasses.replace(presets._DEFINITIONS["w4a4kv4-static"], a_bits=a_bits, act_dynamic=dynamic)
    recipe = presets.recipe("w4a4kv4-static", d)
    D, F, H, KV, hd, V = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                          config.head_dim, config.vocab_size)
    shapes = {"q": (D, H * hd), "k": (D, KV * hd), "v": (D, KV * hd), "o": (H * hd, D),
              "gate": (D, F), "up": (D, F), "down": (F, D)}

    def build():
        layer = {"input_norm": jnp.ones(D), "post_norm": jnp.ones(D),
                 "attn": {n: jnp.zeros(shapes[n]) for n in ("q", "k", "v", "o")},
                 "mlp": {n: jnp.zeros(shapes[n]) for n in ("gate", "up", "down")}}
        params = {"embed": jnp.zeros((V, D)), "final_norm": jnp.ones(D), "lm_head": jnp.zeros((D, V)),
                  "layers": {0: layer}}
        prefix = PrefixKV(k=[jnp.zeros((P, KV, hd))], v=[jnp.zeros((P, KV, hd))], prefix_ids=range(P))
        model = Decoder(config, params, recipe=recipe, prefix=prefix)
        blk = model.layers[0]
        for name in WEIGHT_NAMES:
            blk.set_quantizer(name, jnp.full((1, shapes[name][1]), 0.01))
        for site, spec in recipe.sites:
            if not spec.dynamic:
                if spec.granularity == "head":
                    blk.set_quantizer(site, jnp.full((KV, 1), 0.25), jnp.full((KV, 1), 8.0))
                else:
                    blk.set_quantizer(site, jnp.full((1, 1, 1), 0.5))
        return pack(QuantizedModel(model=model, report={}), backend="kernels", dtype=jnp.bfloat16, kernels="mosaic",
                    interpret=False)

    return nnx.eval_shape(build)


@pytest.mark.parametrize("a_bits,dynamic", [(4, False), (8, True)], ids=["w4a4-static", "w4a8-dynamic"])
def test_llama3_8b_layer_gemms_lower_to_mosaic(a_bits, dynamic):
    """kernels="mosaic", compiled (interpret=False): the int4 GEMMs of a Llama-3-8B runtime layer (prefill of 2048
    tokens and one decode step after 2048, behind a 4-token prefix) lower as Mosaic GPU kernels for sm_90, one call
    per linear (q k v o gate up down: the packed Decoder runs each linear on its own), rotate_quant and
    decode_attention as Triton kernels."""
    config, P, L, T = LLAMA3_8B_LAYER, 4, 2048, 2048
    pm = abstract_packed_model(config, P, a_bits, dynamic)
    graphdef, state = nnx.split(pm)

    def hidden(state, tokens, cache):
        return nnx.merge(graphdef, state).hidden(tokens, cache)

    for case, triton in (("prefill", {"rotate_quant"}), ("decode", {"rotate_quant", "decode_attention"})):
        n_new, cached = (L, 0) if case == "prefill" else (1, T)
        cache = pm.init_cache(1, cached + n_new)
        assert cache.rows == cache_rows(cached + n_new)
        cache = dataclasses.replace(cache, pos=cache.pos + cached)
        text = lower_cuda(hidden, state, jax.ShapeDtypeStruct((1, n_new), jnp.int32), cache)
        calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
        mosaic = [c for c in calls if "@mosaic_gpu" in c]  # one per distinct GEMM shape (a shared private function)
        gemms = re.findall(rf"call @(w4a{a_bits}_matmul_mgpu\w*)\(", text)  # the calls of those functions
        names = {re.search(r'name = "(\w+)"', c).group(1) for c in calls if "xla.gpu.triton" in c}
        # q/o, k/v and gate/up share their shapes: 4 distinct kernels, called 7 times
        assert len(mosaic) == 4 and len(gemms) == len(WEIGHT_NAMES), (case, len(mosaic), gemms)
        assert names == triton, (case, names)


@pytest.mark.parametrize("cmd", [["eval", "--model", "m", "--data", "wikitext2"], ["generate", "--model", "m", "--prompt", "p"]])
def test_cli_kernels_flag(cmd):
    from prefixquant_jax.cli.main import build_parser

    p = build_parser()
    assert p.parse_args(cmd).kernels == "auto"
    assert p.parse_args([*cmd, "--backend", "real", "--kernels", "mosaic"]).kernels == "mosaic"
    with pytest.raises(SystemExit):
        p.parse_args([*cmd, "--kernels", "cuda"])
