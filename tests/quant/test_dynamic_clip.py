"""Dynamic clip ratios of the presets (preset(name, act_clip=, kv_clip=, act_site_clips=)): the recipe's per-token
activation and KV quantizers scale from ratio x the row's range, against a numpy reference of that rule, and the
real int4 runtime computes the same logits as the fake-quant model."""
import jax.numpy as jnp
import numpy as np
import pytest

from prefixquant_jax.presets import preset
from prefixquant_jax.quant.qarray import EPS
from tests.conftest import rng_tokens
from tests.runtime.util import close, forward, int_matmul, logits_of, variant


def np_dynamic_sym(x, bits, ratio, offset=2.0 ** -10):
    """Per-token symmetric full-grid rule in float64: s = ratio * amax / (2^(b-1) - 1/2 + 2^-10), codes clipped to
    [-2^(b-1), 2^(b-1) - 1]."""
    x = np.asarray(x, np.float64)
    s = np.maximum(ratio * np.abs(x).max(-1, keepdims=True) / (2 ** (bits - 1) - 0.5 + offset), EPS)
    return np.clip(np.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s


def np_dynamic_asym(x, bits, ratio):
    """Per-token asymmetric rule (last axis) in float64: range [min(lo, 0), max(hi, 0)] x ratio."""
    x = np.asarray(x, np.float64)
    lo = np.minimum(x.min(-1, keepdims=True), 0.0) * ratio
    hi = np.maximum(x.max(-1, keepdims=True), 0.0) * ratio
    s = np.maximum((hi - lo) / (2 ** bits - 1), EPS)
    z = np.round(-lo / s)
    return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


@pytest.mark.parametrize("ratio", [1.0, 0.85])
def test_preset_dynamic_clip_matches_numpy(ratio):
    recipe = preset("w4a4kv4-dynamic", act_clip=ratio, kv_clip=ratio)
    assert recipe.spec("qkv_in").clip_ratio == ratio and recipe.spec("k_cache").clip_ratio == ratio
    x = np.random.default_rng(0).standard_normal((2, 7, 64)).astype(np.float32) * 3
    out = {}
    for site, ref in (("down_in", np_dynamic_sym(x, 4, ratio)), ("v_cache", np_dynamic_asym(x, 4, ratio))):
        out[site] = np.asarray(recipe.apply_site(site, jnp.asarray(x), {}))
        np.testing.assert_allclose(out[site], ref, rtol=1e-5, atol=1e-5)
    if ratio < 1:  # the clip does something: the largest entries of each row are cut
        assert np.abs(out["down_in"]).max() < 0.99 * np.abs(x).max()


def test_static_preset_ignores_act_clip():
    assert preset("w4a4kv4-static", act_clip=0.5).spec("qkv_in").clip_ratio == 1.0


def test_real_runtime_matches_fake_with_dynamic_clip(tiny_quantized):
    from prefixquant_jax.runtime.pack import pack

    base = tiny_quantized("w4a4kv4-static")
    qm = variant(base, act_dynamic=True, kv_dynamic=True, act_clip=0.85, kv_clip=0.95)
    assert qm.recipe.spec("down_in").clip_ratio == 0.85 and qm.recipe.spec("v_cache").clip_ratio == 0.95
    toks = np.stack([rng_tokens(12, 320, seed=s) for s in (1, 2)])
    fake = logits_of(qm.model, toks)
    real, _ = forward(pack(qm, backend="xla"), toks)
    np.testing.assert_array_equal(real, logits_of(int_matmul(qm), toks))
    close(real, fake)
    unclipped = logits_of(variant(base, act_dynamic=True, kv_dynamic=True).model, toks)
    assert np.abs(unclipped - fake).max() > 1e-3  # the ratios reach the model


def test_per_site_clip_overrides_the_preset_ratio():
    recipe = preset("w4a4kv4-dynamic", act_site_clips={"down_in": 0.7})
    assert recipe.spec("down_in").clip_ratio == 0.7
    assert [recipe.spec(s).clip_ratio for s in ("qkv_in", "o_in", "up_gate_in")] == [0.85] * 3
    x = np.random.default_rng(1).standard_normal((3, 5, 48)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(recipe.apply_site("down_in", jnp.asarray(x), {})),
                               np_dynamic_sym(x, 4, 0.7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [({"act_clip": 0.0}, "preset.act_clip"), ({"kv_clip": 1.5}, "preset.kv_clip"),
                                       ({"act_site_clips": {"nope": 0.8}}, "unknown activation site"),
                                       ({"act_site_clips": {"o_in": -1}}, "preset.act_site_clips")])
def test_bad_clip_ratios_are_user_errors(kw, match):
    from prefixquant_jax.errors import UserError
    with pytest.raises(UserError, match=match):
        preset("w4a4kv4-dynamic", **kw)


def test_cli_site_clip_flag_parses_and_rejects(capsys):
    from prefixquant_jax.cli.flags import _site_clips
    from tests.cli.util import assert_one_line_error, main_cli
    assert _site_clips("0.85,down_in=0.8") == (0.85, (("down_in", 0.8),))
    assert _site_clips("o_in=0.9") == (None, (("o_in", 0.9),))
    assert _site_clips("0.9") == (0.9, None)
    r = main_cli(capsys, "quantize", "--model", "smollm2", "--preset", "w4a4kv4-dynamic", "--dynamic-act-clip",
                 "down=0.8", "--no-eval")
    assert_one_line_error(r, "--dynamic-act-clip SITE=R: unknown activation site 'down'")
