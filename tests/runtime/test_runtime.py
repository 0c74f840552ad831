"""Real int4 runtime (runtime.pack: the same Decoder over packed codes, an integer KV cache) against the fake-quant
model it packs, on the tiny model quantized w4a4kv4-static behind the FP prefix [1] (tests/conftest.tiny_quantized)
and variants of it under other recipes (tests/runtime/util.variant: its calibrated scales reused).

Tolerances (tests/runtime/util.py): the xla backend equals the fake model with matmul "int" bit for bit under jit;
real vs the default (float-product) fake model, and the kernels backend vs xla: |a - b| <= 1e-5 * (1 + max|b|).
Each comparison is meaningful: quantization moves the logits far more than that (checked against the FP model).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.generate import greedy
from prefixquant_jax.nn.decoder import with_prefix, with_recipe
from prefixquant_jax.runtime.cache import QuantKV
from prefixquant_jax.runtime.pack import pack
from tests.cli.util import assert_one_line_error, main_cli
from tests.conftest import rng_tokens
from tests.runtime.util import TOL, close, forward, int_matmul, logits_of, prefill_then_decode, variant


@pytest.fixture(scope="module")
def qm(tiny_quantized):
    return tiny_quantized("w4a4kv4-static")


VARIANTS = [{}, {"act_dynamic": True, "a_bits": 8}, {"w_bits": 8, "a_bits": 8, "kv_bits": 8},
            {"act_dynamic": True, "kv_dynamic": True}, {"kv_dynamic": True, "kv_bits": 8}]
VARIANT_IDS = ["w4a4kv4-static", "w4a8kv4-dynamic", "w8a8kv8-static", "w4a4kv4-dynamic", "kv8-dynamic"]


def _tokens(kw):
    """The test tokens of a variant: batch 1 for the base recipe, batch 2 for the others (one shape per variant
    across the tests below, so each jitted forward is compiled once)."""
    return np.stack([rng_tokens(12, 320, seed=s) for s in ((1,) if not kw else (1, 2))])


@pytest.mark.parametrize("kw", VARIANTS, ids=VARIANT_IDS)
def test_real_xla_equals_fake_int_matmul(qm, kw):
    """pack(qm, "xla") gives the logits of the fake model with matmul "int" exactly, and those of the default fake
    model within TOL."""
    q = variant(qm, **kw) if kw else qm
    toks = _tokens(kw)
    real, cache = forward(pack(q, backend="xla"), toks)
    assert all(isinstance(kv, QuantKV) for kv in cache.kv)
    np.testing.assert_array_equal(real, logits_of(int_matmul(q), toks))
    fake = logits_of(q.model, toks)
    close(real, fake)
    if not kw:  # the comparison is meaningful: quantization moves the logits far more than TOL
        fp = logits_of(with_recipe(q.model, q.recipe.fp_reference()), toks)
        assert np.abs(fp - fake).max() > 1e3 * TOL * (1 + np.abs(fake).max())


DYNAMIC = {"act_dynamic": True, "kv_dynamic": True}


@pytest.mark.parametrize("behind_prefix,kv_dynamic", [(True, False), (False, False), (True, True)],
                         ids=["prefix1", "prefix0", "prefix1-kv-dynamic"])
def test_prefill_then_decode_equals_one_prefill(qm, behind_prefix, kv_dynamic):
    kw = DYNAMIC if kv_dynamic else {}
    q = variant(qm, **kw) if kv_dynamic else qm
    q = q if behind_prefix else q.replace(model=with_prefix(q.model, None))
    pm = pack(q, backend="xla")
    assert pm.prefix_len == (1 if behind_prefix else 0)
    toks = _tokens(kw)
    full, cache_full = forward(pm, toks)
    steps, cache = prefill_then_decode(pm, toks)
    assert int(cache.pos) == int(cache_full.pos) == pm.prefix_len + 12
    close(steps, full)
    for a, b in zip(cache.kv, cache_full.kv):  # identical int4 cache rows
        assert a.dynamic == b.dynamic == kv_dynamic
        np.testing.assert_array_equal(np.asarray(a.k)[:, :12], np.asarray(b.k)[:, :12])
        np.testing.assert_array_equal(np.asarray(a.v)[:, :12], np.asarray(b.v)[:, :12])
        # dynamic KV: each row's (scale, zero) comes from that token's K/V, which one-token decode computes
        # in another float order than the 12-token prefill: equal up to float32 rounding, zeros exactly
        assert a.k_sz.shape == ((len(toks), 12, 2, 2) if kv_dynamic else (0,))
        for x, y in ((a.k_sz, b.k_sz), (a.v_sz, b.v_sz)):
            if kv_dynamic:
                np.testing.assert_allclose(np.asarray(x)[:, :12], np.asarray(y)[:, :12], rtol=1e-6)
                np.testing.assert_array_equal(np.asarray(x)[:, :12, :, 1], np.asarray(y)[:, :12, :, 1])
    close(full, logits_of(q.model, toks))


@pytest.mark.parametrize("kv_dynamic", [False, True], ids=["kv-static", "w4a4kv4-dynamic"])
def test_kernels_backend_equals_xla(qm, kv_dynamic):
    """The kernels backend (Pallas in interpret mode on CPU: rotate_quant, the GEMMs, decode_attention for static
    4-bit KV) against the xla backend, prefill then decode: logits within TOL, the same cache codes (dynamic KV:
    per-row scales within float32 rounding)."""
    kw = DYNAMIC if kv_dynamic else {}
    q = variant(qm, **kw) if kv_dynamic else qm
    toks = _tokens(kw)
    res = {}
    for backend in ("kernels", "xla"):
        steps, cache = prefill_then_decode(pack(q, backend=backend), toks)
        res[backend] = (steps, [np.asarray(a) for kv in cache.kv for a in (kv.k, kv.v, kv.k_sz, kv.v_sz)])
    close(res["kernels"][0], res["xla"][0])
    for i, (a, b) in enumerate(zip(res["kernels"][1], res["xla"][1])):  # kernels rounds the cache up to 16 rows
        if i % 4 < 2:  # the codes: identical
            assert a.shape[1] == 16 and b.shape[1] == 12
            np.testing.assert_array_equal(a[:, :12], b)
        elif kv_dynamic:  # each row's (scale, zero) from K/V of another GEMM: float32 rounding, zeros exactly
            np.testing.assert_allclose(a[:, :12], b, rtol=1e-6)
            np.testing.assert_array_equal(a[:, :12, :, 1], b[..., 1])


def test_greedy_real_matches_fake(qm):
    prompt = [int(t) for t in rng_tokens(4, 320, seed=5)]
    real = greedy(pack(qm, backend="xla"), prompt, 8)
    assert len(real) == 8 and real == greedy(int_matmul(qm), prompt, 8)
    # the default fake model: each generated token is its argmax of a full forward over what precedes it
    full = logits_of(qm.model, np.asarray(prompt + real[:-1])[None])[0]
    assert [int(t) for t in np.argmax(full[len(prompt) - 1:], axis=-1)] == real


@pytest.mark.parametrize("kw,msg", [({"kv_bits": None}, "kv cache is not quantized"), ({"w_bits": None}, "not quantized"),
                                    ({"w_bits": 3}, "4 or 8"), ({"a_bits": 6}, "4 or 8"), ({"kv_bits": 2}, "kv bits")],
                         ids=["kv-fp", "w-fp", "w3", "a6", "kv2"])
def test_unsupported_presets(qm, kw, msg):
    q = variant(qm, init_weights=False, **kw)
    with pytest.raises(UserError, match=f"(?i)cannot run on the real int4 backend.*{msg}") as e:
        pack(q)
    assert "\n" not in str(e.value)


def test_unknown_backend_and_kernels(qm):
    with pytest.raises(UserError, match="unknown runtime backend 'cuda'"):
        pack(qm, backend="cuda")
    with pytest.raises(UserError, match="unknown kernels 'cuda'"):
        pack(qm, kernels="cuda")


def test_cli_backend_real(qm, tiny_dir, text_file, tmp_path, capsys):
    from tests.conftest import tiny_tokenizer

    saved = pq.save(qm, str(tmp_path / "q"), tokenizer=tiny_tokenizer())
    ev = ["eval", "--model", saved, "--data", text_file, "--seqlen", "12", "--max-windows", "1"]
    r = main_cli(capsys, *ev, "--json", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = main_cli(capsys, *ev, "--backend", "real", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    fake, real = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "fr")
    assert real["backend"] == "real" and "real int4" in r.stdout
    assert real["ppl"] == pytest.approx(fake["ppl"], rel=1e-4)
    # --fake-matmul int: the runtime's numbers exactly; its eval log is not the default one's
    log = str(tmp_path / "int.jsonl")
    r = main_cli(capsys, *ev, "--fake-matmul", "int", "--eval-log", log, "--json", str(tmp_path / "i.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    exact = json.loads((tmp_path / "i.json").read_text())
    assert exact["fake_matmul"] == "int" and exact["ppl"] == real["ppl"]
    r = main_cli(capsys, *ev, "--eval-log", log)
    assert_one_line_error(r, "belongs to another evaluation")

    # a full-precision checkpoint, and a saved recipe the runtime cannot run (A6): one line each
    assert_one_line_error(main_cli(capsys, "eval", "--model", tiny_dir, "--backend", "real"), "full-precision checkpoint")
    bad = pq.save(variant(qm, init_weights=False, a_bits=6), str(tmp_path / "a6"), tokenizer=tiny_tokenizer())
    assert_one_line_error(main_cli(capsys, "generate", "--model", bad, "--backend", "real", "--prompt", "x"),
                          "cannot run on the real int4 backend")


def test_pack_shares_and_leaves_the_fake_model(qm):
    """pack gives a new Decoder (kernels replaced by codes in its own tree); the fake model keeps its float kernels
    and recipe, and both share the FP prefix."""
    before = np.asarray(qm.model.layers[0].attn.q.kernel[...])
    pm = pack(qm, backend="xla")
    codes = pm.layers[0].attn.q.kernel[...]
    assert codes.dtype == jnp.int8 and codes.shape == (before.shape[0] // 2, before.shape[1])
    np.testing.assert_array_equal(np.asarray(qm.model.layers[0].attn.q.kernel[...]), before)
    assert qm.model.recipe == qm.recipe and type(qm.recipe).__name__ == "QuantRecipe"
    assert pm.recipe.inner == qm.recipe and pm.prefix_kv.prefix_ids == qm.prefix_kv.prefix_ids == (1,)
