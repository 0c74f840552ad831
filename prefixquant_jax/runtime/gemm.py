"""The integer runtime's two primitives: quantize an activation to packed codes (optionally through a Kronecker
rotation, fused in one Pallas kernel), and multiply codes by packed weight codes (int32 accumulation, then
* s_x * s_w). Backend "kernels": the Pallas kernels (pallas_kernels; interpret mode off a GPU); "xla": the same
integer pipeline through their jnp references, the fake-quant model's numbers exactly (quant/int_linear.py)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from pallas_kernels.gemm_w4a4 import w4a4_matmul_ref
from pallas_kernels.gemm_w4a8 import w4a8_matmul_ref
from pallas_kernels.int4 import pack_int4, unpack_int4
from pallas_kernels.rotate_quant import quantize_ref, rotate_quant
from prefixquant_jax.quant.qarray import QArray
from prefixquant_jax.runtime.kernel_choice import gemm_kernel


@functools.cache
def identity_pair(K: int) -> tuple[np.ndarray, np.ndarray]:
    """(I_n1, I_n2), n1 * n2 = K, n2 the largest power of two <= 64 dividing K: rotate_quant's "no rotation"."""
    n2 = 2
    while K % (n2 * 2) == 0 and n2 < 64:
        n2 *= 2
    return np.eye(K // n2), np.eye(n2)


def quantize_activation(x2, spec, scale, backend: str, pair=None, lac=None, interpret: bool | None = None) -> QArray:
    """x2 [M, K] -> QArray of symmetric codes (int4 packed two per byte along K, or int8) and scale f32 [1, 1]
    (static, given) or [M, 1] (dynamic per token, `spec.clip_ratio` x the row's amax, or the LAC factors `lac`).
    `pair`: a Kronecker pair (P1, P2) applied first (x2 @ (P1 kron P2)); the kernels backend fuses it (it needs
    one: identity otherwise), the xla backend takes x2 already transformed (pair None)."""
    s = None if spec.dynamic else scale
    if backend == "kernels":
        codes, s = rotate_quant(x2, pair if pair is not None else identity_pair(x2.shape[-1]), s, bits=spec.bits,
                                clip_ratio=spec.clip_ratio, lac=lac, full_grid=spec.full_grid, interpret=interpret)
    else:
        q, s = quantize_ref(x2.astype(jnp.float32), s, bits=spec.bits, clip_ratio=spec.clip_ratio,
                            full_grid=spec.full_grid)
        codes = pack_int4(q, axis=-1) if spec.bits == 4 else q
    return codes_qarray(codes, s, spec.bits)


def codes_qarray(codes, scale, bits: int) -> QArray:
    """A per-token (or per-tensor) symmetric activation QArray of codes [M, K(/2)] as the GEMMs take them."""
    return QArray(qvalue=codes, scale=scale, zero_point=None, bits=bits, granularity="token",
                  packed_axis=codes.ndim - 1 if bits == 4 else None)


def int_gemm(x: QArray, w: QArray, backend: str, out_dtype, interpret: bool | None = None, kernels: str = "auto"):
    """(x's codes @ w's codes) * x.scale * w.scale, [M, N] in out_dtype; int32 accumulation. x: codes [M, K(/2)];
    w: [K(/2), N] (4 bits: packed along K). kernels: Mosaic GPU or Triton GEMMs (runtime/kernel_choice.py)."""
    if w.bits == 4:
        if backend == "kernels":
            fn = gemm_kernel(x.bits, kernels, interpret)
        else:
            fn = w4a4_matmul_ref if x.bits == 4 else w4a8_matmul_ref
        return fn(x.qvalue, x.scale, w.qvalue, w.scale, out_dtype)
    qx = unpack_int4(x.qvalue, axis=-1) if x.bits == 4 else x.qvalue  # W8: no kernel, an XLA int8 dot
    acc = jnp.dot(qx, w.qvalue, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x.scale * w.scale).astype(out_dtype)
