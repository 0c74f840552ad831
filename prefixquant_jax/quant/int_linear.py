"""Integer products inside the fake-quant model: each quantized linear computed the way the integer runtime does.

The default fake-quant forward multiplies dequantized floats, (q_x s_x) @ (q_w s_w), whose float32
rounding differs from the integer kernels' acc = q_x @ q_w (exact), y = acc * s_x * s_w. That ~1e-7
difference flips the odd 4-bit code at a rounding tie downstream, and a 4-bit model amplifies it
(RESULTS.md, [E]). With `QuantRecipe(matmul="int")` an activation site that feeds a linear hands
the linear a QArray (quant/qarray.py: straight-through float codes and scale; its dequantize() is
the fake-quant value) and `int_linear` computes the
runtime's numbers: the exact integer accumulation (an f32 dot while every partial sum stays below
2^24, else an int32 dot), then `* s_x * s_w` in the runtime's order. Gradients are those of the float
product x_dq @ k_fq (custom VJP), so training sees the usual straight-through / LSQ gradients.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def exact_in_f32(a_bits: int, w_bits: int, K: int) -> bool:
    """Every partial sum of a K-long dot of a_bits x w_bits symmetric codes is an integer below 2^24."""
    return (2 ** (a_bits - 1)) * (2 ** (w_bits - 1)) * K < 2 ** 24


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def int_linear(x_dq, k_fq, qx, sx, qw, sw, use_int32: bool):
    """acc(qx @ qw) * sx * sw with the gradients of x_dq @ k_fq. qx [..., K], qw [K, N] integer-valued
    f32; sx broadcastable to [..., 1], sw [1, N]. Result float32 [..., N]."""
    if use_int32:
        acc = jnp.dot(qx.astype(jnp.int32), qw.astype(jnp.int32), preferred_element_type=jnp.int32)
    else:
        acc = jnp.dot(qx, qw, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return acc.astype(jnp.float32) * sx * sw


def _fwd(x_dq, k_fq, qx, sx, qw, sw, use_int32):
    return int_linear(x_dq, k_fq, qx, sx, qw, sw, use_int32), (x_dq, k_fq, qx, sx, qw, sw)


def _bwd(use_int32, res, g):
    x_dq, k_fq, qx, sx, qw, sw = res
    g = g.astype(jnp.float32)
    gx = (g @ k_fq.astype(jnp.float32).T).astype(x_dq.dtype)
    gk = jnp.einsum("...k,...n->kn", x_dq.astype(jnp.float32), g).astype(k_fq.dtype)
    zeros = tuple(jnp.zeros_like(a) for a in (qx, sx, qw, sw))
    return (gx, gk) + zeros


int_linear.defvjp(_fwd, _bwd)
