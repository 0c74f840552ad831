"""FlatQuant in the real int4 runtime (runtime/recipe.py around a merged FlatQuantRecipe) against the merged
fake-quant FlatQuant model: the tiny model quantized (trained, merged) with flatquant-w4a4kv4 (dynamic A and KV
with LAC, no prefix) and flatquant-w4a4kv4-static-prefix (FP prefix [1], static scales, KV mapped back to the
original space), shared session fixtures (tests/conftest.tiny_quantized).

The runtime applies the same online transforms with the recipe's own functions and quantizes with the same rules
(LAC included), so integer codes are equal: the xla backend equals the fake model with matmul "int" bit for bit
(under jit), the default fake model within the tolerance of tests/runtime/util.py, |a - b| <= 1e-5 * (1 + max|b|).
"""
import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.errors import UserError
from prefixquant_jax.flatquant.recipe import FlatQuantRecipe
from prefixquant_jax.nn.decoder import Decoder
from prefixquant_jax.options import FlatOptions
from prefixquant_jax.runtime.pack import pack
from tests.conftest import rng_tokens
from tests.flatquant.test_merge import QSITES, W4, flat_model
from tests.runtime.util import close, forward, int_matmul, logits_of, prefill_then_decode

TOKENS = np.stack([rng_tokens(12, 320, seed=s) for s in (1, 2)])
NAMES = {False: "flatquant-w4a4kv4", True: "flatquant-w4a4kv4-static-prefix"}


@pytest.fixture(scope="module")
def fp_model(tiny_ck):
    return Decoder(tiny_ck.config, tiny_ck.params)


def flat_qm(tiny_quantized, static: bool, param: str = "inverse"):
    kw = {} if param == "inverse" else {"flatquant": FlatOptions(param=param)}
    qm = tiny_quantized(NAMES[static], **kw)
    assert qm.recipe.merged and qm.recipe.prefix == static and qm.prefix_len == (1 if static else 0)
    return qm


@pytest.mark.parametrize("static,param", [(False, "inverse"), pytest.param(False, "orthogonal", marks=pytest.mark.slow),
                                          (True, "inverse")],
                         ids=["dynamic-inverse", "dynamic-orthogonal", "static-prefix"])
def test_flat_real_matches_fake(tiny_quantized, fp_model, static, param):
    qm = flat_qm(tiny_quantized, static, param)
    pm = pack(qm, backend="xla")
    assert pm.recipe.flat and pm.recipe.maps_kv_back == static and not pm.recipe.rotate
    toks = TOKENS
    real, _ = forward(pm, toks)
    np.testing.assert_array_equal(real, logits_of(int_matmul(qm), toks))
    fake = logits_of(qm.model, toks)
    close(real, fake)
    fp = logits_of(fp_model, toks)  # quantization is on
    assert np.abs(fp - fake).max() > 1e3 * 1e-5 * (1 + np.abs(fake).max())


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-prefix"])
def test_flat_prefill_then_decode_and_kernels(tiny_quantized, static):
    """Prefill 8 tokens then decode 4, on the xla backend and on the kernels backend (Pallas, interpret mode on CPU:
    the fused rotate_quant with the Kronecker pairs, the GEMMs): both within TOL of the xla backend's one prefill."""
    qm = flat_qm(tiny_quantized, static)
    toks = TOKENS  # those of test_flat_real_matches_fake: its compiled prefill is reused
    full, _ = forward(pack(qm, backend="xla"), toks)
    for backend in ("xla", "kernels"):
        steps, _ = prefill_then_decode(pack(qm, backend=backend), toks)
        close(steps, full)


def test_unmerged_flatquant_refused(tiny_ck):
    q = flat_model(tiny_ck, FlatQuantRecipe(name="flatquant-w4a4kv4", sites=QSITES, weight=W4, prefix=False))
    with pytest.raises(UserError, match="cannot run on the real int4 backend.*not merged") as e:
        pack(pq.QuantizedModel(model=q, report={}))
    assert "\n" not in str(e.value)


def test_flat_saved_model_packs_the_same(tiny_quantized, tmp_path):
    qm = flat_qm(tiny_quantized, static=False)
    loaded = pq.load(pq.save(qm, str(tmp_path / "flat")))
    toks = np.stack([rng_tokens(12, 320, seed=s) for s in (6, 7)])
    np.testing.assert_array_equal(forward(pack(loaded, backend="xla"), toks)[0],
                                  forward(pack(qm, backend="xla"), toks)[0])


def test_best_of_both_runs_real_as_fake(tiny_quantized):
    """flatquant-w4a4kv4-prefix with the Hadamard start and GPTQ (the best of both methods): merged, behind the FP
    prefix, dynamic A4/KV4 with K/V mapped back to the prefix's space; the real backend equals `--fake-matmul int`."""
    qm = tiny_quantized("flatquant-w4a4kv4-prefix", flatquant=FlatOptions(start="hadamard"), gptq=True)
    assert qm.recipe.merged and qm.prefix_len == 1 and len(qm.report["gptq"]) == 2
    pm = pack(qm, backend="xla")
    assert pm.recipe.maps_kv_back
    real, _ = forward(pm, TOKENS)
    np.testing.assert_array_equal(real, logits_of(int_matmul(qm), TOKENS))
    close(real, logits_of(qm.model, TOKENS))
