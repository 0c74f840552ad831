"""Model families (config.FAMILIES: Qwen2, Qwen3, Mistral, Llama-3) end to end on tiny random transformers models.

Weights are peaky (tests/conftest.make_tiny_family: 5x the default init, random norms and biases, logits up
to ~3.5), so a dropped bias or q/k norm moves the logits by > 1e-2 (checked: the negative controls below).
Tolerances, float32: our logits vs transformers' max abs diff <= 1e-4 (seen ~2e-6); the rotated FP model
vs the FP model <= 1e-4 * (1 + max |logit|) (seen 2e-6 to 4e-6); quantized eval, real int4 runtime vs fake quant,
perplexity within 0.5 % (slow; tests/runtime/test_runtime_families.py covers real vs fake logits of Qwen2 and
Qwen3 by default).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prefixquant_jax.checkpoint.export import export_hf, export_rotated_hf
from prefixquant_jax.checkpoint.fp import load_checkpoint
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import Decoder
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params
from tests.cli.util import assert_one_line_error, main_cli
from tests.conftest import FAMILIES, make_tiny_family, rng_tokens, tiny_family_config

TOL = 1e-4
MODEL_TYPE = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "llama3": "llama"}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """family -> (HF directory with tokenizer, the transformers model), built once."""
    out = {}
    for f in FAMILIES:
        d = tmp_path_factory.mktemp(f)
        out[f] = (str(d), make_tiny_family(d, f))
    return out


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


def our_logits(config, params, ids, recipe=None):
    return np.asarray(Decoder(config, params, recipe=recipe)(jnp.asarray(np.asarray(ids)[None]))[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(fam, family):
    path, ref = fam[family]
    ck = load_checkpoint(path)
    c = ck.config
    assert c.model_type == MODEL_TYPE[family]
    assert (c.attention_bias, c.qk_norm) == (family == "qwen2", family == "qwen3")
    if family == "qwen3":
        assert c.head_dim == 32 != c.hidden_size // c.num_heads
    ids = rng_tokens(40, c.vocab_size)
    want, got = hf_logits(ref, ids), our_logits(c, ck.params, ids)
    assert np.abs(want).max() > 2.0
    assert np.abs(got - want).max() <= TOL
    # negative controls: without the family's difference the logits are far off
    if family == "qwen2":
        params = {**ck.params, "layers": {i: {**lp, "attn": {k: (0 * v if k.endswith("_bias") else v) for k, v in lp["attn"].items()}}
                                          for i, lp in ck.params["layers"].items()}}
        assert np.abs(our_logits(c, params, ids) - want).max() > 1e-2
    elif family == "qwen3":
        params = {**ck.params, "layers": {i: {**lp, "attn": {k: (np.ones_like(v) if k.endswith("_norm") else v)
                                                              for k, v in lp["attn"].items()}}
                                          for i, lp in ck.params["layers"].items()}}
        assert np.abs(our_logits(c, params, ids) - want).max() > 1e-2
    elif family == "llama3":
        import dataclasses
        assert np.abs(our_logits(dataclasses.replace(c, rope_scaling=None), ck.params, ids) - want).max() > 1e-2


@pytest.mark.parametrize("family,fmt", [("qwen2", "bin"), ("qwen3", "sharded")])
def test_torch_bin_and_sharded(tmp_path, family, fmt):
    ref = make_tiny_family(tmp_path, family, fmt=fmt, seed=1, tokenizer=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".bin") for f in files) if fmt == "bin" else sum(f.endswith(".safetensors") for f in files) > 1
    ck = load_checkpoint(str(tmp_path))
    ids = rng_tokens(40, ck.config.vocab_size, seed=1)
    assert np.abs(our_logits(ck.config, ck.params, ids) - hf_logits(ref, ids)).max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_fp_equals_fp(fam, family):
    """Norms folded, R1/R2/R4 fused (the v bias rotated by R2), R3/R4 online (R3 after q/k norm and RoPE)."""
    ck = load_checkpoint(fam[family][0])
    ids = rng_tokens(40, ck.config.vocab_size, seed=3)
    ref = our_logits(ck.config, ck.params, ids)
    params, config = rotate_params(ck.params, ck.config, RotationConfig(seed=1))
    if family == "qwen2":  # the rotation changed the v bias (R2) and kept q/k biases (input side only)
        a0, r0 = ck.params["layers"][0]["attn"], params["layers"][0]["attn"]
        np.testing.assert_array_equal(r0["q_bias"], a0["q_bias"])
        assert np.abs(r0["v_bias"] - a0["v_bias"]).max() > 1e-2
    got = our_logits(config, params, ids, QuantRecipe(rotate=True))
    assert np.abs(got - ref).max() <= TOL * (1 + np.abs(ref).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_loads_in_transformers(fam, family, tmp_path):
    """export-hf writes the family's config and names back; R1/R2-rotated export too (transformers runs it)."""
    from transformers import AutoModelForCausalLM

    path, ref = fam[family]
    ck = load_checkpoint(path)
    ids = rng_tokens(40, ck.config.vocab_size, seed=2)
    want = hf_logits(ref, ids)
    for name, fn in (("plain", export_hf), ("rotated", export_rotated_hf)):
        out = fn(ck.params, ck.config, str(tmp_path / name))
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["model_type"] == MODEL_TYPE[family]
        assert cfg["architectures"] == [type(ref).__name__]
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(hf) is type(ref)
        assert np.abs(hf_logits(hf, ids) - want).max() <= TOL * (1 + np.abs(want).max()), name
        again = load_checkpoint(out)
        assert again.config.model_type == ck.config.model_type


def test_llama_config_dict_unchanged():
    """A Llama's config.json as written before the families existed (saved checkpoints keep their metadata)."""
    d = ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=2).to_hf_dict()
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert not {"sliding_window", "use_sliding_window"} & set(d) and d["attention_bias"] is False


def one_line_error(r, pattern):
    assert_one_line_error(r, pattern)
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr[-2000:]


def _write_config(path, family, **over):
    cfg = tiny_family_config(family).to_dict()
    cfg.update(over)
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_bad_configs_one_line(tmp_path, capsys):
    bad = _write_config(tmp_path / "phi", "qwen2", model_type="phi3", architectures=["Phi3ForCausalLM"])
    one_line_error(main_cli(capsys, "eval", "--model", str(bad)), "model_type 'phi3'")
    win = _write_config(tmp_path / "win", "qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0,
                        layer_types=None)
    one_line_error(main_cli(capsys, "eval", "--model", str(win)), "use_sliding_window with sliding_window=64")
    ob = _write_config(tmp_path / "ob", "qwen3", attention_bias=True)
    one_line_error(main_cli(capsys, "eval", "--model", str(ob)), "o_proj bias")


def test_sliding_window_rules():
    base = tiny_family_config("qwen2").to_dict()
    # Qwen2: a window on no layer (max_window_layers = all) or longer than max_position_embeddings is ignored
    assert ModelConfig.from_hf_dict({**base, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2,
                                     "layer_types": None}).sliding_window is None
    assert ModelConfig.from_hf_dict({**base, "use_sliding_window": True, "sliding_window": 4096}).sliding_window is None
    # Mistral: kept; a sequence longer than the window is refused (it is not applied), a shorter one runs
    c = ModelConfig.from_hf_dict({**tiny_family_config("mistral").to_dict(), "sliding_window": 16})
    assert c.sliding_window == 16 and c.to_hf_dict()["sliding_window"] == 16
    shapes = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 96), "up": (64, 96), "down": (96, 64)}
    lp = {"input_norm": np.ones(64), "post_norm": np.ones(64), "attn": {n: np.zeros(s) for n, s in shapes.items() if n in "qkvo"},
          "mlp": {n: np.zeros(s) for n, s in shapes.items() if n not in "qkvo"}}
    m = Decoder(c, {"embed": np.zeros((320, 64)), "final_norm": np.ones(64), "lm_head": np.zeros((64, 320)),
                    "layers": {0: lp, 1: lp}})
    assert m(jnp.zeros((1, 16), jnp.int32)).shape == (1, 16, 320)
    with pytest.raises(UserError, match="exceed the model's sliding_window=16"):
        m(jnp.zeros((1, 17), jnp.int32))


def test_unexpected_bias_named(fam, tmp_path):
    """A Qwen2 state dict under a Llama config: the first bias is named, not silently dropped."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(fam["qwen2"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"unexpected tensor layers.0.attn.[qkv]_bias"):
        load_checkpoint(str(d))


TRAIN = ("--train", "--train-samples", "4", "--train-seqlen", "24", "--epochs", "1", "--train-batch-size", "2")
RUNS = [(f, "w4a4kv4-static", ()) for f in FAMILIES] + [
    ("qwen2", "w4a4kv4-static", ("--gptq",) + TRAIN), ("qwen3", "w4a4kv4-static", ("--gptq",) + TRAIN),
    ("qwen2", "flatquant-w4a4kv4", TRAIN), ("qwen3", "flatquant-w4a4kv4", TRAIN)]


@pytest.mark.slow
@pytest.mark.parametrize("family,preset,extra", RUNS, ids=[f"{f}-{p}{'-gptq' if '--gptq' in e else ''}{'-train' if e else ''}"
                                                           for f, p, e in RUNS])
def test_quantize_save_eval_real_equals_fake(fam, family, preset, extra, text_file, tmp_path, capsys):
    """quantize --preset P [GPTQ, block-wise training] --save, then eval --backend real vs fake: perplexity within 0.5 %."""
    path = fam[family][0]
    saved = str(tmp_path / "q")
    r = main_cli(capsys, "quantize", "--model", path, "--preset", preset, "--calib-data", text_file,
                 "--calib-samples", "2", "--calib-seqlen", "24", "--outlier-samples", "2", "--eval-data", text_file,
                 "--seqlen", "24", "--max-windows", "1", "--save", saved, "--json", str(tmp_path / "q.json"), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = ["eval", "--model", saved, "--data", text_file, "--seqlen", "24", "--max-windows", "2"]
    ppl = {}
    for backend in ("fake", "real"):
        r = main_cli(capsys, *ev, "--backend", backend, "--json", str(tmp_path / f"{backend}.json"))
        assert r.returncode == 0, r.stderr[-3000:]
        ppl[backend] = json.loads((tmp_path / f"{backend}.json").read_text())["ppl"]
    fp = json.loads((tmp_path / "q.json").read_text())["fp_ppl"]
    print(f"{family} {preset} {' '.join(extra)}: fp {fp:.4f} fake {ppl['fake']:.4f} real {ppl['real']:.4f} real/fake {ppl['real'] / ppl['fake']:.6f}")
    assert abs(ppl["real"] / ppl["fake"] - 1) <= 5e-3, ppl
    assert ppl["fake"] != pytest.approx(fp, rel=1e-3)  # quantization is active
