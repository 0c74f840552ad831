"""GPTQ (Frantar et al., arXiv 2210.17323) for the per-output-channel weight quantizer.

The scales are fixed first (RTN init with its MSE-searched clip, `quantize.init_weight_scales`, or the output-aware clip of calibrate.py);
GPTQ then picks the integer codes row by row of the kernel (= one input channel, a "column" in
the paper's [out, in] layout) and spreads each row's rounding error over the rows not yet
quantized, weighted by the inverse Hessian H = sum_tokens x x^T of the linear's input. The result
is written back as the dequantized kernel (codes x scale): values on the quantizer's grid, so the
forward's fake quantization with the same scale returns them unchanged and training can go on
from there.

`gptq_kernel` is a pure numpy function (float64, host); `gptq_model` runs it block by block: the
Hessians of block l come from its inputs after the already-GPTQ'd blocks 0..l-1 (behind the FP
prefix KV), with full-precision activations, as in QuaRot's GPTQ pass.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.spec import QuantSpec

# which sown input Gram matrix feeds which linear
LINEAR_INPUT = {"q": "qkv_in", "k": "qkv_in", "v": "qkv_in", "o": "o_in", "gate": "up_gate_in", "up": "up_gate_in",
                "down": "down_in"}


def _inverse_hessian_factor(gram: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor U of H^-1 with H^-1 = U^T U, mask of dead input channels)."""
    H = np.array(gram, np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    try:
        return np.linalg.cholesky(np.linalg.inv(H)).T, dead
    except np.linalg.LinAlgError:
        raise UserError("GPTQ: the input Hessian is not positive definite even after damping; raise --gptq-damp") from None


def _round_rows(w: np.ndarray, scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    return np.clip(np.round(w / scale), spec.qmin, spec.qmax) * scale


def gptq_kernel(kernel, gram, scale, spec: QuantSpec, damp: float = 0.01, block: int = 128) -> np.ndarray:
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
    return _gptq_with_factor(kernel, _inverse_hessian_factor(gram, damp), scale, spec, block)


def _gptq_with_factor(kernel, factor, scale, spec: QuantSpec, block: int = 128) -> np.ndarray:
    """gptq_kernel given `factor` = _inverse_hessian_factor(gram, damp), shared by linears fed by one input."""
    U, dead = factor
    W = np.array(kernel, np.float64)
    n = W.shape[0]
    s = np.asarray(scale, np.float64).reshape(1, -1)
    W[dead] = 0.0
    Q = np.zeros_like(W)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        Wb = W[b0:b1].copy()
        Eb = np.zeros_like(Wb)
        for i in range(b1 - b0):
            q = _round_rows(Wb[i:i + 1], s, spec)
            err = (Wb[i] - q[0]) / U[b0 + i, b0 + i]
            Q[b0 + i] = q[0]
            Wb[i + 1:] -= np.outer(U[b0 + i, b0 + i + 1:b1], err)
            Eb[i] = err
        W[b1:] -= U[b0:b1, b1:].T @ Eb
    return Q.astype(np.float32)


def output_error(kernel, quantized, gram) -> float:
    """sum over calibration tokens of ||x @ (kernel - quantized)||^2 = tr(D^T H D)."""
    D = np.asarray(kernel, np.float64) - np.asarray(quantized, np.float64)
    return float(np.einsum("io,ij,jo->", D, np.asarray(gram, np.float64), D))


def gptq_model(q_model, recipe, calib_x: np.ndarray, prefix_kv, damp: float = 0.01, chunk: int = 8,
               progress: bool = True) -> list[dict]:
    """Replace every linear kernel of q_model with its GPTQ result, block by block (in place).

    q_model must already hold the weight scales (qparams["w_<name>"]). calib_x: embedded calibration
    tokens [N, L, D]. Returns per-layer {linear: (RTN output error, GPTQ output error)} on the
    calibration inputs, the quantity GPTQ minimises.
    """
    from prefixquant_jax.block_runner import BlockRunner

    if recipe is None or recipe.weight is None:
        raise UserError("GPTQ needs a preset with quantized weights")
    runner = BlockRunner(q_model.config, prefix_kv, calib_x.shape[1])
    fp_view = recipe.replace(sites=(), weight=None)  # Hessians: this block's FP weights and FP activations
    wq_view = recipe.replace(sites=())  # propagation: quantized weights, FP activations
    x, reports = calib_x, []
    for layer, blk in enumerate(tqdm(q_model.layers, desc="gptq", disable=not progress, leave=False)):
        blk.recipe = fp_view
        grams = runner.grams(blk, layer, x, chunk)
        for site, g in grams.items():
            if not np.all(np.isfinite(g)):
                raise UserError(f"GPTQ: non-finite activations at layer {layer} {site}")
        factors = {site: _inverse_hessian_factor(g, damp) for site, g in grams.items()}  # once per shared input
        errs = {}
        for name, site in LINEAR_INPUT.items():
            mod = blk.linear_module(name)
            w = np.asarray(mod.kernel[...], np.float32)
            scale = np.asarray(blk.qparams["w_" + name][...], np.float32)
            g = grams[site]
            new = _gptq_with_factor(w, factors[site], scale, recipe.weight)
            errs[name] = (output_error(w, _round_rows(w, scale, recipe.weight), g), output_error(w, new, g))
            mod.kernel[...] = jnp.asarray(new, mod.kernel[...].dtype)
        blk.recipe = wq_view
        x = runner.forward(blk, layer, x, chunk)
        blk.recipe = recipe
        reports.append({"layer": layer, "rtn_err": {k: v[0] for k, v in errs.items()},
                        "gptq_err": {k: v[1] for k, v in errs.items()}})
    return reports
