"""GPTQ: against an OBQ-style numpy reference, block-size invariance, error below RTN, on-grid output,
and the block-by-block pass on the tiny model (in process and through the CLI)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from prefixquant_jax.quant.gptq import gptq_kernel, output_error
from prefixquant_jax.quant.ops import fake_quant, weight_scale
from prefixquant_jax.quant.spec import QuantSpec
from tests.cli.util import assert_one_line_error, main_cli

SPEC = QuantSpec(bits=4, granularity="channel", symmetric=True)


def _problem(n_in=48, n_out=20, tokens=400, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)
    x = rng.normal(size=(tokens, n_in)) @ (np.eye(n_in) + 2 * mix)  # correlated inputs: GPTQ has something to use
    x[:, 5] = 0.0  # one dead input channel
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    scale = np.asarray(weight_scale(jnp.asarray(w), SPEC, (1.0, 0.9, 0.8)))
    return w, x.T @ x, scale


def obq_reference(w, gram, scale, damp):
    """GPTQ written the OBQ way: explicit inverse Hessian of the remaining rows, eliminated one row at a time."""
    W = np.array(w, np.float64)
    H = np.array(gram, np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H += damp * np.mean(np.diag(H)) * np.eye(len(H))
    W[dead] = 0.0
    Hinv = np.linalg.inv(H)
    s = np.asarray(scale, np.float64).reshape(-1)
    Q = np.zeros_like(W)
    for i in range(len(W)):
        Q[i] = np.clip(np.round(W[i] / s), -8, 7) * s
        err = (W[i] - Q[i]) / Hinv[i, i]
        W[i + 1:] -= np.outer(Hinv[i + 1:, i], err)
        Hinv = Hinv - np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]  # drop row/col i (Gaussian elimination)
    return Q


def test_matches_obq_reference():
    w, gram, scale = _problem()
    ours = gptq_kernel(w, gram, scale, SPEC, damp=0.01)
    ref = obq_reference(w, gram, scale, 0.01)
    codes_ours, codes_ref = np.round(ours / scale), np.round(ref / scale)
    # same algorithm, different float paths: a code may flip only at an exact rounding tie (none expected here)
    assert np.mean(codes_ours != codes_ref) == 0.0
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_act_order_is_the_reference_on_permuted_inputs():
    """act order = GPTQ in the order of decreasing Hessian diagonal: the OBQ reference run on the
    permuted problem, its rows put back."""
    w, gram, scale = _problem(seed=3)
    gram = gram * np.linspace(0.2, 3.0, len(gram))[:, None] * np.linspace(0.2, 3.0, len(gram))[None, :]
    order = np.argsort(-np.diag(gram), kind="stable")
    ref = np.empty_like(w, dtype=np.float64)
    ref[order] = obq_reference(w[order], gram[np.ix_(order, order)], scale, 0.01)
    ours = gptq_kernel(w, gram, scale, SPEC, damp=0.01, act_order=True)
    assert np.mean(np.round(ours / scale) != np.round(ref / scale)) == 0.0
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert np.all(ours[5] == 0.0)  # the dead channel, wherever the order puts it
    assert not np.array_equal(ours, gptq_kernel(w, gram, scale, SPEC, damp=0.01))  # the order matters


def test_block_size_does_not_matter():
    w, gram, scale = _problem(seed=1)
    np.testing.assert_array_equal(np.round(gptq_kernel(w, gram, scale, SPEC, block=7) / scale),
                                  np.round(gptq_kernel(w, gram, scale, SPEC, block=128) / scale))


def test_lower_output_error_than_rtn_and_on_grid():
    w, gram, scale = _problem(seed=2)
    g = gptq_kernel(w, gram, scale, SPEC)
    rtn = np.asarray(fake_quant(jnp.asarray(w), SPEC, scale=jnp.asarray(scale)))
    assert output_error(w, g, gram) < 0.8 * output_error(w, rtn, gram)
    # the forward's fake quantization with the same scale leaves the GPTQ kernel unchanged
    np.testing.assert_array_equal(np.asarray(fake_quant(jnp.asarray(g), SPEC, scale=jnp.asarray(scale))), g)
    assert np.all(g[5] == 0.0)  # the dead input channel
    assert np.all(np.abs(np.round(g / scale)) <= 8)


def test_rejects_other_granularity():
    from prefixquant_jax.errors import UserError

    w, gram, scale = _problem()
    with pytest.raises(UserError, match="per-channel"):
        gptq_kernel(w, gram, scale, QuantSpec(bits=4, granularity="tensor"))


def test_gptq_pass_on_tiny_model(tiny_quantized):
    qm = tiny_quantized("w4a4kv4-static", gptq=True)
    rep = qm.report["gptq"]
    assert len(rep) == 2
    for layer in rep:  # the quantity GPTQ minimises, on the calibration inputs, per linear
        for name, rtn in layer["rtn_err"].items():
            assert layer["gptq_err"][name] <= rtn * (1 + 1e-6), (layer["layer"], name)
    blk = qm.model.layers[0]
    k, s = blk.attn.q.kernel[...], blk.qparams["q"]["scale"][...]
    np.testing.assert_array_equal(np.asarray(blk.recipe.apply_weight("q", k, blk.qparams)), np.asarray(k))
    assert "calibration" in qm.report and np.all(np.isfinite(np.asarray(s)))


def test_cli_gptq(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "g.json"
    common = ["--model", tiny_dir, "--calib-data", text_file, "--calib-samples", "4", "--calib-seqlen", "32",
              "--outlier-samples", "4", "--eval-data", text_file, "--seqlen", "32", "--max-windows", "2", "--eta", "4"]
    r = main_cli(capsys, "quantize", "--preset", "w4a4kv4-dynamic", *common, "--gptq", "--no-fp", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert np.isfinite(res["ppl"]) and len(res["report"]["gptq"]) == 2
    assert_one_line_error(main_cli(capsys, "quantize", "--preset", "fp", *common, "--gptq"), "--gptq needs")
    assert_one_line_error(main_cli(capsys, "quantize", "--preset", "w4a4kv4-static", *common, "--gptq", "--gptq-damp",
                                   "0"), "--gptq-damp")
