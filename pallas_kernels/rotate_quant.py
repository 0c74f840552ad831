"""Fused online rotation + symmetric quantization (+ int4 packing) of activations.

    y = x @ R,    q = clip(round(y / scale), qmin, qmax),    out = pack_int4(q) (bits=4) or q (bits=8)

Rotation R (a [K, K] orthogonal matrix) is never formed; it is a Kronecker product R = kron(P1, P2)
with P1 [n1, n1], P2 [n2, n2], K = n1 * n2, applied per row as two small matmuls:
    X = x_row.reshape(n1, n2) (row-major),   Y = P1^T X P2,   y_row = Y.reshape(K)
which is exactly x_row @ kron(P1, P2). `rotation` is the pair (P1, P2), given by the caller: this
package builds no matrices (it imports nothing of prefixquant_jax). A Hadamard rotation is such a pair
(prefixquant_jax.rotate.hadamard.hadamard_kron_factors: both factors ~sqrt(K), so K = 4096 is two
64 x 64 matmuls instead of one dense 4096 x 4096), and so is a FlatQuant Kronecker transform.

Scale: None -> dynamic per token, scale = max(amax(|y_row|) * clip_ratio / d, 1e-8) with d = qmax, or
d = qmax + 1/2 + 2^-10 with `full_grid` (the 2^bits - 1 steps span [-amax, amax]; the formula of
prefixquant_jax.quant.ops for symmetric quantizers, QuantSpec.sym_divisor), returned as f32 [M, 1]; or a static f32
[1, 1] scale (returned as given). `lac=(c_min, c_max)` (dynamic only; FlatQuant's learned activation
clipping, the factors already passed through the sigmoid) replaces the range rule by
scale = max(max(-min(y_row.min(), 0) * c_min, max(y_row.max(), 0) * c_max) / qmax, 1e-8), the rule of
prefixquant_jax.flatquant.recipe.lac_qparams. bits=4: codes in [-8, 7], qmax = 7, packed along the last axis with
the pallas_kernels.int4 layout -> int8 [M, K/2]. bits=8: codes in [-128, 127], int8 [M, K] unpacked.

Kernel: one row per program (grid (M,)). X is loaded as an [n1p, n2p] tile; t = P1^T X; for int4 the
even and odd output columns come from two dots with P2[:, 0::2] and P2[:, 1::2], so packing is a
nibble OR with no in-kernel interleave. All math is float32 (input cast in the kernel). To keep tiles
Triton-friendly (power-of-two, >= 16), n1/n2 are padded to powers of two >= 16 with zero rows/columns
(a copy of x only when K's factors are not such powers, e.g. K = 576 -> 36 x 16 is padded to 64 x 16,
and 16 output byte columns for 8 real ones); padded entries are exact zeros and are sliced away.
Rounding is round-half-to-even (same as jnp.round), implemented with floor/select (see _common).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MIN_DOT,
    default_warps,
    next_pow2,
    pack_lo_hi,
    pad_to,
    resolve_interpret,
    round_half_even,
    triton_params,
)
from pallas_kernels.int4 import pack_int4

EPS = 1e-8  # same floor as prefixquant_jax.quant.ops.EPS
FULL_GRID_OFFSET = 2.0 ** -10  # prefixquant_jax.quant.spec.FULL_GRID_OFFSET: -amax lands past the rounding tie


def _factors(rotation, K: int):
    if isinstance(rotation, str) or len(rotation) != 2:
        raise ValueError(f"rotation must be a Kronecker pair (P1, P2), got {rotation!r}")
    P1, P2 = rotation
    if P1.shape[0] * P2.shape[0] != K or P1.shape[0] != P1.shape[1] or P2.shape[0] != P2.shape[1]:
        raise ValueError(f"Kronecker pair {P1.shape} x {P2.shape} does not match K={K}")
    return P1, P2


def _qrange(bits: int):
    if bits == 4:
        return -8, 7
    if bits == 8:
        return -128, 127
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def _divisor(bits: int, full_grid: bool) -> float:
    """amax / scale of the dynamic rule (module docstring)."""
    qmax = _qrange(bits)[1]
    return qmax + 0.5 + FULL_GRID_OFFSET if full_grid else float(qmax)


def _rq_kernel(x_ref, a_ref, *rest, bits: int, dynamic: bool, clip_ratio: float, lac: bool, full_grid: bool):
    b_refs, (s_in_ref, lac_ref, o_ref, s_ref) = rest[:-4], rest[-4:]
    qmin, qmax = _qrange(bits)
    div = _divisor(bits, full_grid)
    x = x_ref[...].astype(jnp.float32)
    t = jnp.dot(a_ref[...], x, preferred_element_type=jnp.float32)  # P1^T X, [n1p, n2p]
    ys = [jnp.dot(t, b[...], preferred_element_type=jnp.float32) for b in b_refs]  # 1 (int8) or 2 (int4)
    if dynamic and lac:  # padded entries are zeros: harmless, the range always includes 0
        lo = jnp.zeros((1, 1), jnp.float32)
        hi = jnp.zeros((1, 1), jnp.float32)
        for y in ys:
            lo = jnp.minimum(lo, jnp.min(jnp.min(y, axis=1, keepdims=True), axis=0, keepdims=True))
            hi = jnp.maximum(hi, jnp.max(jnp.max(y, axis=1, keepdims=True), axis=0, keepdims=True))
        # slice the ref, not a loaded value: Triton's lowering has no rule for lax.slice
        c_min, c_max = lac_ref[:, pl.ds(0, 1)], lac_ref[:, pl.ds(1, 1)]
        scale = jnp.maximum(jnp.maximum(-(lo * c_min), hi * c_max) / div, EPS)
    elif dynamic:
        amax = jnp.zeros((1, 1), jnp.float32)
        for y in ys:
            row = jnp.max(jnp.abs(y), axis=1, keepdims=True)
            amax = jnp.maximum(amax, jnp.max(row, axis=0, keepdims=True))
        scale = jnp.maximum(amax * clip_ratio / div, EPS)
    else:
        scale = s_in_ref[...]
    s_ref[...] = scale
    qs = [jnp.clip(round_half_even(y / scale), qmin, qmax).astype(jnp.int8) for y in ys]
    o_ref[...] = pack_lo_hi(qs[0], qs[1]) if bits == 4 else qs[0]


def rotate_quant(x, rotation, scale=None, *, bits: int = 4, clip_ratio: float = 1.0, lac=None,
                 full_grid: bool = False, interpret: bool | None = None, num_warps: int | None = None):
    """(codes, scale): x [M, K] bf16/f32 rotated by `rotation`, quantized symmetrically and packed.

    rotation: a Kronecker pair (P1 [n1, n1], P2 [n2, n2]) with n1 * n2 = K.
    Returns int8 [M, K/2] (bits=4, packed) or int8 [M, K] (bits=8), and scale f32 [M, 1] (dynamic,
    scale=None) or [1, 1] (static). lac: (c_min, c_max) clip factors of the dynamic range (module
    docstring). See the module docstring for the rotation convention.
    """
    if lac is not None and scale is not None:
        raise ValueError("lac clipping applies to dynamic (scale=None) quantization only")
    K = x.shape[1]
    if K % 2:
        raise ValueError(f"K must be even, got {K}")
    P1, P2 = _factors(rotation, K)
    if bits == 4 and P2.shape[0] % 2:
        raise ValueError(f"int4 packing needs an even inner factor, got n2={P2.shape[0]}")
    _qrange(bits)
    return _rotate_quant(x, jnp.asarray(P1, jnp.float32), jnp.asarray(P2, jnp.float32), scale, _lac_operand(lac),
                         bits=bits, clip_ratio=float(clip_ratio), lac=lac is not None, full_grid=bool(full_grid),
                         interpret=resolve_interpret(interpret), num_warps=num_warps)


def _lac_operand(lac):
    """(c_min, c_max) as f32 [1, 2] (ones when unused)."""
    if lac is None:
        return jnp.ones((1, 2), jnp.float32)
    return jnp.stack([jnp.asarray(c, jnp.float32).reshape(()) for c in lac]).reshape(1, 2)


@functools.partial(jax.jit, static_argnames=("bits", "clip_ratio", "lac", "full_grid", "interpret", "num_warps"))
def _rotate_quant(x, P1, P2, scale, lac_c, *, bits: int, clip_ratio: float, lac: bool, full_grid: bool, interpret: bool,
                  num_warps: int | None):
    M = x.shape[0]
    n1, n2 = P1.shape[0], P2.shape[0]
    n1p, n2p = max(MIN_DOT, next_pow2(n1)), max(MIN_DOT, next_pow2(n2))
    dynamic = scale is None

    a = pad_to(pad_to(P1.T, 0, n1p), 1, n1p)
    if bits == 4:
        nout = max(MIN_DOT, next_pow2(n2 // 2))
        bs = [pad_to(pad_to(P2[:, 0::2], 0, n2p), 1, nout), pad_to(pad_to(P2[:, 1::2], 0, n2p), 1, nout)]
    else:
        nout = n2p
        bs = [pad_to(pad_to(P2, 0, n2p), 1, nout)]
    x3 = pad_to(pad_to(x.reshape(M, n1, n2), 1, n1p), 2, n2p)
    s_in = jnp.ones((1, 1), jnp.float32) if dynamic else jnp.asarray(scale, jnp.float32).reshape(1, 1)

    kernel = functools.partial(_rq_kernel, bits=bits, dynamic=dynamic, clip_ratio=clip_ratio, lac=lac,
                               full_grid=full_grid)
    codes, s_out = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((M, n1p, nout), jnp.int8), jax.ShapeDtypeStruct((M, 1), jnp.float32)),
        grid=(M,),
        in_specs=[pl.BlockSpec((None, n1p, n2p), lambda i: (i, 0, 0)),
                  pl.BlockSpec((n1p, n1p), lambda i: (0, 0))]
        + [pl.BlockSpec((n2p, nout), lambda i: (0, 0)) for _ in bs]
        + [pl.BlockSpec((1, 1), lambda i: (0, 0)), pl.BlockSpec((1, 2), lambda i: (0, 0))],
        out_specs=(pl.BlockSpec((None, n1p, nout), lambda i: (i, 0, 0)), pl.BlockSpec((1, 1), lambda i: (i, 0))),
        interpret=interpret,
        compiler_params=triton_params(default_warps(n1p * n2p, num_warps)),
        name="rotate_quant",
    )(x3, a, *bs, s_in, lac_c)
    width = n2 // 2 if bits == 4 else n2
    codes = codes[:, :n1, :width].reshape(M, n1 * width)
    return codes, (s_out if dynamic else s_in)


def rotate_ref(x, rotation):
    """Unfused float32 rotation: x @ kron(P1, P2) as one einsum contraction."""
    xf = x.astype(jnp.float32)
    P1, P2 = (jnp.asarray(p, jnp.float32) for p in _factors(rotation, x.shape[-1]))
    X = xf.reshape(x.shape[0], P1.shape[0], P2.shape[0])
    Y = jnp.einsum("mij,ia,jb->mab", X, P1, P2, precision=jax.lax.Precision.HIGHEST)
    return Y.reshape(x.shape)


def quantize_ref(y, scale=None, *, bits: int = 4, clip_ratio: float = 1.0, lac=None, full_grid: bool = False):
    """Symmetric quantization of float32 y [M, K] with jnp.round; returns (codes int8 [M, K], scale).
    lac: (c_min, c_max) clip factors of the dynamic range, as in rotate_quant."""
    return _quantize_ref(y, scale, _lac_operand(lac), bits=bits, clip_ratio=clip_ratio, lac=lac is not None,
                         full_grid=bool(full_grid))


@functools.partial(jax.jit, static_argnames=("bits", "clip_ratio", "lac", "full_grid"))
def _quantize_ref(y, scale, lac_c, *, bits: int, clip_ratio: float, lac: bool, full_grid: bool):
    qmin, qmax = _qrange(bits)
    div = _divisor(bits, full_grid)
    if scale is None and lac:
        lo = jnp.minimum(jnp.min(y, axis=-1, keepdims=True), 0.0) * lac_c[:, 0:1]
        hi = jnp.maximum(jnp.max(y, axis=-1, keepdims=True), 0.0) * lac_c[:, 1:2]
        scale = jnp.maximum(jnp.maximum(-lo, hi) / div, EPS)
    elif scale is None:
        amax = jnp.max(jnp.abs(y), axis=-1, keepdims=True)
        scale = jnp.maximum(amax * clip_ratio / div, EPS)
    else:
        scale = jnp.asarray(scale, jnp.float32).reshape(1, 1)
    return jnp.clip(jnp.round(y / scale), qmin, qmax).astype(jnp.int8), scale


def rotate_quant_ref(x, rotation, scale=None, *, bits: int = 4, clip_ratio: float = 1.0, lac=None,
                     full_grid: bool = False):
    """Unfused reference of rotate_quant: rotate_ref, quantize_ref, then int4.pack_int4 when bits=4."""
    q, s = quantize_ref(rotate_ref(x, rotation), scale, bits=bits, clip_ratio=clip_ratio, lac=lac, full_grid=full_grid)
    return (pack_int4(q, axis=-1) if bits == 4 else q), s
