"""FlatQuant-GPTQ: GPTQ on the merged, LWC-clamped transformed kernels at their scales, Hessians of the transformed
inputs, against a numpy reference (the transform, the RMSNorm and the Gram written out; GPTQ the OBQ way)."""
import numpy as np
import pytest

import prefixquant_jax as pq
from tests.conftest import TINY_CALIB
from tests.quant.test_gptq import obq_reference


def _untrained(qm, groups):  # the transforms as initialised: the reference sees the same merged model
    return {}


@pytest.fixture(scope="module")
def pair(tiny_ck):
    """(merged FlatQuant RTN, the same with GPTQ): same seed, no training, natural GPTQ order."""
    kw = dict(flatquant=pq.FlatOptions(train=_untrained), train=pq.TrainConfig(samples=4, seqlen=16, epochs=1,
                                                                                  batch_size=2))
    rtn = pq.quantize(tiny_ck, TINY_CALIB, "flatquant-w4a4kv4", **kw)
    gptq = pq.quantize(tiny_ck, TINY_CALIB, "flatquant-w4a4kv4", gptq=True, gptq_act_order=False, **kw)
    return rtn, gptq


def test_qkv_of_layer_0_match_numpy(tiny_ck, pair):
    from prefixquant_jax.flatquant.transforms import factors

    rtn, gptq = pair
    b_rtn, b_gptq = rtn.model.layers[0], gptq.model.layers[0]
    cfg = tiny_ck.config
    # layer 0's q/k/v input: RMSNorm of the embedded tokens (its weight holds the folded smoothing scales), then
    # x @ (P1 kron P2), the online part the merge leaves
    x = np.asarray(tiny_ck.params["embed"], np.float64)[TINY_CALIB].reshape(-1, cfg.hidden_size)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    h = h * np.asarray(b_rtn.input_norm.weight[...], np.float64)
    (p1, _), (p2, _) = factors(b_rtn.transforms, "qkv_in", "inverse")
    xt = h @ np.kron(np.asarray(p1, np.float64), np.asarray(p2, np.float64))
    gram = xt.T @ xt
    for name in ("q", "k", "v"):
        w = np.asarray(b_rtn.linear_module(name).kernel[...], np.float64)  # merged: transformed and LWC-clamped
        scale = np.asarray(b_rtn.qparams[name]["scale"][...], np.float64)
        np.testing.assert_array_equal(np.asarray(b_gptq.qparams[name]["scale"][...]), scale)  # the scales stay
        ref = obq_reference(w, gram, scale, 0.01)
        ours = np.asarray(b_gptq.linear_module(name).kernel[...], np.float64)
        # fp32 vs fp64 Grams: a code may flip at a near tie; every value on the grid of its channel's scale
        codes = ours / scale
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
        assert np.mean(np.round(codes) != np.round(ref / scale)) < 0.01, name
        assert not np.array_equal(ours, np.clip(np.round(w / scale), -8, 7) * scale), name  # GPTQ moved codes


def test_every_linear_on_grid_and_below_rtn(pair):
    rtn, gptq = pair
    reports = gptq.report["gptq"]
    assert [r["layer"] for r in reports] == [0, 1]
    for r in reports:  # output error per token on the transformed inputs: GPTQ below RTN for every linear
        assert all(r["gptq_err"][n] < r["rtn_err"][n] for n in r["rtn_err"]), r
    for b_rtn, b_gptq in zip(rtn.model.layers, gptq.model.layers):
        for name in ("o", "gate", "up", "down"):
            k = np.asarray(b_gptq.linear_module(name).kernel[...], np.float64)
            codes = k / np.asarray(b_gptq.qparams[name]["scale"][...], np.float64)
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
            assert np.round(codes).min() >= -8 and np.round(codes).max() <= 7


def test_refused_without_the_merge(tiny_ck):
    with pytest.raises(pq.UserError, match="FlatOptions.merge"):
        pq.quantize(tiny_ck, TINY_CALIB, "flatquant-w4a4kv4", gptq=True, flatquant=pq.FlatOptions(merge=False))
