"""Which Pallas GPU backend runs the runtime's integer GEMMs: Mosaic GPU or Triton (RuntimeSpec.kernels).

  "auto"    Mosaic GPU where it compiles and supports the call: on a Hopper GPU (compute capability
            9.0: wgmma is sm_90a-only), for every W4A4 / W4A8 GEMM shape (the kernels pad M, N, K);
            Triton elsewhere, and always in interpret mode off the GPU (the Mosaic GPU interpreter
            simulates threads and shared memory, for the kernel tests; it is far slower than Triton's)
  "mosaic"  Mosaic GPU for the GEMMs, also in interpret mode (tests); Triton where Mosaic has no kernel
  "triton"  the Triton kernels (the previous default), kept for comparison and as the fallback
Fused rotate+quantize and decode attention run on Triton under every choice. The Mosaic GEMMs take
the weights K-major ([N, K/2]); the runtime stores them [K/2, N], so each Mosaic call transposes its
weight (an XLA copy of the packed weight) until the packed model stores them K-major.
"""
from __future__ import annotations

import functools

import jax

from pallas_kernels._common import resolve_interpret
from pallas_kernels.gemm_mgpu import w4a4_matmul_mgpu, w4a8_matmul_mgpu
from pallas_kernels.gemm_w4a4 import w4a4_matmul
from pallas_kernels.gemm_w4a8 import w4a8_matmul

KERNELS = ("auto", "mosaic", "triton")


def hopper_gpu() -> bool:
    """Whether JAX's first device is a compute-capability 9.0 GPU (H100 / H200)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")) == "9.0"


def use_mosaic(kernels: str, interpret: bool | None) -> bool:
    """Whether the int4 GEMMs run on Mosaic GPU for RuntimeSpec.kernels / .interpret (module docstring)."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r} (one of {', '.join(KERNELS)})")
    if kernels == "auto":
        return not resolve_interpret(interpret) and hopper_gpu()
    return kernels == "mosaic"


def gemm_kernel(a_bits: int, kernels: str, interpret: bool | None):
    """The W4A{a_bits} GEMM fn(codes, x_scale, w_packed [K/2, N], w_scale, out_dtype) to call."""
    if use_mosaic(kernels, interpret):
        fn = w4a4_matmul_mgpu if a_bits == 4 else w4a8_matmul_mgpu
    else:
        fn = w4a4_matmul if a_bits == 4 else w4a8_matmul
    return functools.partial(fn, interpret=interpret)
