"""Every Mosaic GPU kernel lowers for CUDA sm_90 at the GPU benchmark shapes, checked on the CPU.

Under an abstract H100 mesh, `.lower(lowering_platforms=("cuda",))` runs Pallas' Mosaic GPU lowering in
Python (no GPU, no execution): layouts, the wgmma operand rules (an int8 B operand must be K-major: an
N-major one fails with "Only f16 WGMMA supports transposes"), and the kernel's shared memory against the
227 KB of a Hopper block (Mosaic raises "exceeds available shared memory"). The lowered module is one
`mosaic_gpu` custom call per kernel; its text holds the wgmma instructions, so the test also reads
which MMA runs (int8 x int8 -> int32 for the GEMMs, bf16 for the weight-only GEMV). Speed needs a GPU.
Shapes: Llama-3-8B's (benchmarks/bench_kernels.py) and odd SmolLM2-sized ones.
"""
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gemm_mgpu import w4a4_matmul_mgpu, w4a8_matmul_mgpu
from pallas_kernels.gemv_mgpu import gemv_w4_mgpu

S = jax.ShapeDtypeStruct
F32, I8, BF16 = jnp.float32, jnp.int8, jnp.bfloat16
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def lower_cuda(fn, *args) -> str:
    """The StableHLO text of jit(fn)(*args) lowered for CUDA under an abstract H100 mesh."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def mosaic_mma(text: str) -> list[str]:
    """The distinct wgmma MMA instructions of the Mosaic GPU kernels in `text`; asserts one kernel."""
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == 1 and "@mosaic_gpu" in calls[0], calls
    assert "triton" not in text
    return sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", text)))


GEMM_SHAPES = [(2048, 4096, 4096), (2048, 4096, 14336), (2048, 14336, 4096), (16, 4096, 4096), (1, 4096, 14336),
               (8192, 4096, 4096), (37, 576, 960), (5, 1536, 576)]


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "per-tensor"])
def test_w4a4_w4a8_mgpu_lower_for_sm90(M, K, N, static):
    xs = S((1, 1) if static else (M, 1), F32)
    w, ws = S((K // 2, N), I8), S((1, N), F32)
    for fn, x in ((w4a4_matmul_mgpu, S((M, K // 2), I8)), (w4a8_matmul_mgpu, S((M, K), I8))):
        mma = mosaic_mma(lower_cuda(lambda x, xs, w, ws, fn=fn: fn(x, xs, w, ws, interpret=False), x, xs, w, ws))
        assert mma and all(m.endswith(".s32.s8.s8") for m in mma), (fn.__name__, mma)


def test_int32_output_and_transposed_weights_lower():
    args = S((64, 2048), I8), S((64, 1), F32), S((4096, 2048), I8), S((1, 4096), F32)
    text = lower_cuda(lambda *a: w4a4_matmul_mgpu(*a, return_int32=True, w_transposed=True, interpret=False), *args)
    assert mosaic_mma(text)


def test_shared_memory_overflow_is_caught_by_the_lowering():
    """The SMEM check is live: 8 stages of 128 x 128 x 256 tiles need ~330 KB."""
    args = S((2048, 2048), I8), S((2048, 1), F32), S((2048, 4096), I8), S((1, 4096), F32)
    with pytest.raises(ValueError, match="shared memory"):
        lower_cuda(lambda *a: w4a4_matmul_mgpu(*a, stages=8, interpret=False), *args)


@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, None), (4096, 14336, 128), (14336, 4096, None), (1536, 576, 128)])
def test_gemv_mgpu_lowers_for_sm90(M, K, N, group):
    scale = S((1, N) if group is None else (K // group, N), F32)
    text = lower_cuda(lambda x, w, s: gemv_w4_mgpu(x, w, s, interpret=False), S((M, K), BF16), S((K // 2, N), I8), scale)
    mma = mosaic_mma(text)
    assert mma and all(m.endswith(".f32.bf16.bf16") for m in mma), mma
