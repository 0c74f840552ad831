"""The real int4 runtime lowers for CUDA with its Pallas kernels compiled (not interpreted), on the CPU.

RuntimeSpec.interpret=False forces the GPU path of every kernel; the packed tiny models of the runtime
tests are lowered for prefill and for one decode step, and the Triton kernels each one contains are
listed (see tests/pallas_kernels/test_gpu_lowering.py for what lowering does and does not check).
"""
import dataclasses

import jax.numpy as jnp
import pytest

from prefixquant_jax.runtime import pack
from prefixquant_jax.runtime.model import empty_cache, hidden
from tests.conftest import rng_tokens
from tests.pallas_kernels.test_gpu_lowering import cuda_kernels
from tests.runtime.test_runtime import tiny, variant  # noqa: F401 - tiny is a fixture
from tests.runtime.test_runtime_flat import ck, flat_qm  # noqa: F401 - ck is a fixture


def lowered_kernels(qm):
    """{"prefill": kernels of a 6-token prefill, "decode": kernels of one decode step} for qm's packed model."""
    pm = pack(qm, backend="kernels")
    pm = dataclasses.replace(pm, spec=dataclasses.replace(pm.spec, interpret=False))
    toks = jnp.asarray(rng_tokens(6, 320, seed=1)[None])
    cache = empty_cache(pm, 1, 8)
    out = {}
    for case, t in (("prefill", toks), ("decode", toks[:, :1])):
        out[case] = set(cuda_kernels(lambda pm, t, c: hidden(pm, t, c, pm.spec.prefix_len + (6 if t.shape[1] == 1 else 0)),
                                     pm, t, cache))
    return out


@pytest.mark.parametrize("kw,gemm", [({}, "w4a4_matmul"), ({"act_dynamic": True, "a_bits": 8}, "w4a8_matmul")],
                         ids=["w4a4kv4-static", "w4a8kv4-dynamic"])
def test_prefixquant_runtime_lowers_to_triton(tiny, kw, gemm):  # noqa: F811
    qm = variant(tiny[0], **kw) if kw else tiny[0]
    k = lowered_kernels(qm)
    assert k["prefill"] == {"rotate_quant", gemm}
    assert k["decode"] == {"rotate_quant", gemm, "decode_attention"}


@pytest.mark.parametrize("static", [False, True], ids=["flatquant-w4a4kv4", "flatquant-static-prefix"])
def test_flatquant_runtime_lowers_to_triton(ck, static):  # noqa: F811
    k = lowered_kernels(flat_qm(ck, static=static))
    # dynamic FlatQuant keeps KV per token (no decode kernel); static-prefix caches K/V in the original
    # space, which the decode kernel cannot read either: both decode with jnp attention
    assert k["prefill"] == k["decode"] == {"rotate_quant", "w4a4_matmul"}
