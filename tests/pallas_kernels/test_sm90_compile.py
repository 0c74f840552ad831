"""Every kernel at the GPU benchmark shapes compiles for Hopper (sm_90) and fits it, checked offline.

pallas_kernels.sm90_check lowers each kernel for CUDA and compiles the Triton IR to a cubin with the
`triton` package (no GPU or driver needed). Asserted per kernel: shared memory within an H100 block's
227 KB, no register spills (stack 0), and for the W4A4 / W4A8 GEMMs int8 tensor-core MMA (Hopper has no
int4 MMA: the codes are unpacked to int8 in the kernel). The numbers come from the triton package's
compiler, which is not the Triton inside XLA's GPU backend; they are the closest offline estimate.
Skipped where triton is not installed (the test extra installs it on Linux x86_64).
"""
import pytest

pytest.importorskip("triton")

from pallas_kernels.sm90_check import benchmark_cases, check  # noqa: E402

H100_SMEM_PER_BLOCK = 227 * 1024
CASES = benchmark_cases()


@pytest.mark.parametrize("label,fn,args", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_sm90_without_spills(label, fn, args):
    (r,) = check(fn, *args)
    assert r.shared_bytes <= H100_SMEM_PER_BLOCK, r
    assert r.stack_bytes == 0 and r.registers <= 255, r
    assert r.mma, r  # every kernel's inner products run on tensor cores
    if label.startswith(("w4a4", "w4a8")):
        assert all(".s32.s8.s8" in m for m in r.mma), r.mma


def test_four_warps_spill_the_large_gemm_tile():
    """Why default_warps picks 8 warps for 128 x 128 tiles: the same tile with Triton's default 4 spills."""
    label, fn, args = CASES[0]
    assert label.startswith("w4a4 M=2048")
    from pallas_kernels import w4a4_matmul

    (r,) = check(lambda *a: w4a4_matmul(*a, interpret=False, num_warps=4), *args)
    assert r.num_warps == 4 and r.stack_bytes > 0
