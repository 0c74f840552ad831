"""The real int4 runtime lowers for CUDA with its Pallas kernels compiled (not interpreted), on the CPU.

pack(..., backend="kernels", interpret=False) forces the GPU path of every kernel; the packed tiny models of the
runtime tests are lowered for a prefill and for one decode step, and the Triton kernels each one contains are
listed (see tests/pallas_kernels/test_gpu_lowering.py for what lowering does and does not check).
"""
import dataclasses

import jax.numpy as jnp
import pytest
from flax import nnx

from prefixquant_jax.runtime.pack import pack
from tests.conftest import rng_tokens
from tests.pallas_kernels.test_gpu_lowering import cuda_kernels
from tests.runtime.util import variant


def lowered_kernels(qm):
    """{"prefill": kernels of a 6-token prefill, "decode": kernels of one decode step after it} for qm's packed
    model (behind its prefix)."""
    pm = pack(qm, backend="kernels", interpret=False)
    graphdef, state = nnx.split(pm)
    toks = jnp.asarray(rng_tokens(6, 320, seed=1)[None])
    empty = pm.init_cache(1, 8)
    after = dataclasses.replace(empty, pos=empty.pos + 6)
    fn = lambda state, t, c: nnx.merge(graphdef, state).hidden(t, c)  # noqa: E731
    return {"prefill": set(cuda_kernels(fn, state, toks, empty)),
            "decode": set(cuda_kernels(fn, state, toks[:, :1], after))}


@pytest.mark.parametrize("kw,gemm", [({}, "w4a4_matmul"), ({"act_dynamic": True, "a_bits": 8}, "w4a8_matmul")],
                         ids=["w4a4kv4-static", "w4a8kv4-dynamic"])
def test_prefixquant_runtime_lowers_to_triton(tiny_quantized, kw, gemm):
    qm = tiny_quantized("w4a4kv4-static")
    k = lowered_kernels(variant(qm, **kw) if kw else qm)
    assert k["prefill"] == {"rotate_quant", gemm}
    assert k["decode"] == {"rotate_quant", gemm, "decode_attention"}


@pytest.mark.parametrize("static", [False, True], ids=["flatquant-w4a4kv4", "flatquant-static-prefix"])
def test_flatquant_runtime_lowers_to_triton(tiny_quantized, static):
    k = lowered_kernels(tiny_quantized("flatquant-w4a4kv4-static-prefix" if static else "flatquant-w4a4kv4"))
    # dynamic FlatQuant keeps KV per token (no decode kernel); static-prefix caches K/V in the original
    # space, which the decode kernel cannot read either: both decode with jnp attention
    assert k["prefill"] == k["decode"] == {"rotate_quant", "w4a4_matmul"}
