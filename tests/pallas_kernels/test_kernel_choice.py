"""The runtime's GEMM backend switch (RuntimeSpec.kernels, --kernels): Mosaic GPU or Triton.

The runtime's int_matmul gives the same numbers through the Mosaic GEMMs (GPU interpret mode here),
the Triton GEMMs (interpret mode) and the jnp references (backend "xla").
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pack_int4
from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.qarray import QArray
from prefixquant_jax.runtime import kernel_choice
from benchmarks import bench_layer
from prefixquant_jax.runtime.model import int_matmul
from prefixquant_jax.runtime.pack import runtime_spec
from tests.pallas_kernels.test_mgpu_lowering import lower_cuda


def test_use_mosaic():
    assert not kernel_choice.hopper_gpu()  # this CPU
    assert not kernel_choice.use_mosaic("auto", None)  # interpret mode: Triton
    assert kernel_choice.use_mosaic("mosaic", None) and not kernel_choice.use_mosaic("triton", False)
    with pytest.raises(ValueError):
        kernel_choice.use_mosaic("cuda", None)
    with pytest.raises(UserError):
        runtime_spec(None, kernels="cuda")


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
def test_int_matmul_same_on_both_backends(a_bits):
    rng = np.random.default_rng(a_bits)
    M, K, N = 5, 128, 40
    hi = 8 if a_bits == 4 else 128
    qx = rng.integers(-hi, hi, (M, K))
    codes = pack_int4(qx, axis=-1) if a_bits == 4 else jnp.asarray(qx, jnp.int8)
    xs = rng.uniform(0.01, 0.1, (M, 1)).astype(np.float32)
    w = _qarray(rng.integers(-8, 8, (K, N)), rng.uniform(0.01, 0.1, (1, N)).astype(np.float32))
    out = {k: np.asarray(int_matmul(codes, xs, a_bits, w, "kernels", jnp.float32, True, k)) for k in ("mosaic", "triton")}
    ref = np.asarray(int_matmul(codes, xs, a_bits, w, "xla", jnp.float32))
    np.testing.assert_array_equal(out["mosaic"], ref)
    np.testing.assert_array_equal(out["triton"], ref)


@pytest.mark.parametrize("a_bits,dynamic", [(4, False), (8, True)], ids=["w4a4-static", "w4a8-dynamic"])
def test_llama3_8b_layer_gemms_lower_to_mosaic(a_bits, dynamic):
    """kernels="mosaic", compiled (interpret=False): the four int4 GEMMs of a Llama-3-8B runtime layer
    (prefill of 2048 tokens and one decode step) lower as Mosaic GPU kernels for sm_90, rotate_quant and
    decode_attention as Triton kernels."""
    config, P, L, T = bench_layer.LLAMA3_8B_LAYER, 4, 2048, 2048
    spec = dataclasses.replace(bench_layer.build_spec(config, P, a_bits, dynamic, "kernels", interpret=False),
                               kernels="mosaic")
    lp = jax.eval_shape(lambda: bench_layer.build(config, spec)[1])  # shapes only
    real = bench_layer.real_layer(config, spec)
    KV, hd = config.num_kv_heads, config.head_dim
    prefix = jax.ShapeDtypeStruct((P, KV, hd), jnp.float32)
    for case, triton in (("prefill", {"rotate_quant"}), ("decode", {"rotate_quant", "decode_attention"})):
        n_new, cached, rows = bench_layer.case_shapes(config, case, L, T)
        cache = jax.ShapeDtypeStruct((1, rows, KV, hd // 2), jnp.int8)
        x = jax.ShapeDtypeStruct((1, n_new, config.hidden_size), jnp.bfloat16)
        text = lower_cuda(real, lp, x, cache, cache, prefix, prefix, cached)
        calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
        mosaic = [c for c in calls if "@mosaic_gpu" in c]
        names = {re.search(r'name = "(\w+)"', c).group(1) for c in calls if "xla.gpu.triton" in c}
        assert len(mosaic) == 4 and names == triton, (case, len(mosaic), names)


@pytest.mark.parametrize("cmd", [["eval", "--model", "m", "--data", "d"], ["generate", "--model", "m", "--prompt", "p"]])
def test_cli_kernels_flag(cmd):
    from prefixquant_jax.cli import build_parser

    p = build_parser()
    assert p.parse_args(cmd).kernels == "auto"
    assert p.parse_args([*cmd, "--backend", "real", "--kernels", "mosaic"]).kernels == "mosaic"
    with pytest.raises(SystemExit):
        p.parse_args([*cmd, "--kernels", "cuda"])
