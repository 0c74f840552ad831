"""GPTQ (Frantar et al., arXiv 2210.17323) for the per-output-channel weight quantizer.

The scales are fixed first (the data-free or the output-aware clip, calibrate.py); GPTQ then picks the integer codes row by row of the kernel (= one input channel, a "column" in
the paper's [out, in] layout) and spreads each row's rounding error over the rows not yet
quantized, weighted by the inverse Hessian H = sum_tokens x x^T of the linear's input. The result
is written back as the dequantized kernel (codes x scale): values on the quantizer's grid, so the
forward's fake quantization with the same scale returns them unchanged and training can go on
from there.

`gptq_kernel` is a pure numpy function (float64, host); calibrate.py runs it block by block: the
Hessians of block l are the Gram matrices of its FP-activation inputs after the already quantized
blocks 0..l-1 (behind the FP prefix KV), shared with the output-aware clip search.
"""
from __future__ import annotations

import numpy as np

from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.spec import QuantSpec

# which sown input Gram matrix feeds which linear
LINEAR_INPUT = {"q": "qkv_in", "k": "qkv_in", "v": "qkv_in", "o": "o_in", "gate": "up_gate_in", "up": "up_gate_in",
                "down": "down_in"}


def inverse_hessian_factor(gram: np.ndarray, damp: float, act_order: bool = False):
    """(upper Cholesky factor U of H^-1 with H^-1 = U^T U, mask of dead input channels, order).

    `order` is the sequence in which input channels are quantized (U is of H permuted by it): the
    natural order, or with `act_order` the channels of largest Hessian diagonal first (GPTQ's
    "act order": the largest-energy inputs are rounded while the most rows can still absorb their
    error). The scales are per output channel, so the order changes no scale and costs nothing at
    inference.
    """
    H = np.array(gram, np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(H.shape[0])
    H = H[np.ix_(order, order)]
    try:
        return np.linalg.cholesky(np.linalg.inv(H)).T, dead, order
    except np.linalg.LinAlgError:
        raise UserError("GPTQ: the input Hessian is not positive definite even after damping; raise "
                        "QuantizeOptions.gptq_damp", "QuantizeOptions.gptq_damp") from None


def round_to_grid(w: np.ndarray, scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """RTN of w on the per-output-channel grid `scale` (what GPTQ rounds each row to)."""
    return np.clip(np.round(w / scale), spec.qmin, spec.qmax) * scale


def gptq_kernel(kernel, gram, scale, spec: QuantSpec, damp: float = 0.01, block: int = 128,
                act_order: bool = False) -> np.ndarray:
    """GPTQ-quantized kernel [in, out] (dequantized, float32), for a symmetric per-channel `spec`.

    kernel: [in, out] (x @ kernel); gram: [in, in] = sum of x^T x over calibration tokens; scale: [1, out]
    (or [out]) fixed per-output-channel scales. Input channels never active (zero Gram diagonal) are
    quantized to 0. Lazy batch updates in blocks of `block` rows (the result does not depend on it).
    """
    if not (spec.symmetric and spec.granularity == "channel"):
        raise UserError(f"GPTQ supports symmetric per-channel weights only, got {spec.granularity} symmetric={spec.symmetric}")
    n = np.shape(kernel)[0]
    if np.shape(gram) != (n, n):
        raise UserError(f"GPTQ: Gram matrix {np.shape(gram)} does not match kernel rows {n}")
    return gptq_with_factor(kernel, inverse_hessian_factor(gram, damp, act_order), scale, spec, block)


def gptq_with_factor(kernel, factor, scale, spec: QuantSpec, block: int = 128) -> np.ndarray:
    """gptq_kernel given `factor` = inverse_hessian_factor(gram, damp), shared by linears fed by one input."""
    U, dead, order = factor
    W = np.array(kernel, np.float64)
    n = W.shape[0]
    s = np.asarray(scale, np.float64).reshape(1, -1)
    W[dead] = 0.0
    W = W[order]
    Q = np.zeros_like(W)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        Wb = W[b0:b1].copy()
        Eb = np.zeros_like(Wb)
        for i in range(b1 - b0):
            q = round_to_grid(Wb[i:i + 1], s, spec)
            err = (Wb[i] - q[0]) / U[b0 + i, b0 + i]
            Q[b0 + i] = q[0]
            Wb[i + 1:] -= np.outer(U[b0 + i, b0 + i + 1:b1], err)
            Eb[i] = err
        W[b1:] -= U[b0:b1, b1:].T @ Eb
    out = np.empty_like(Q)
    out[order] = Q
    return out.astype(np.float32)


def output_error(kernel, quantized, gram) -> float:
    """sum over calibration tokens of ||x @ (kernel - quantized)||^2 = tr(D^T H D)."""
    D = np.asarray(kernel, np.float64) - np.asarray(quantized, np.float64)
    return float(np.sum(D * (np.asarray(gram, np.float64) @ D)))
