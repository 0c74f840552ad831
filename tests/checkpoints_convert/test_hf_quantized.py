"""export-hf of a saved quantized model: the dequantized weights load in transformers with our logits."""
import json

import jax.numpy as jnp
import numpy as np

import prefixquant_jax
from checkpoints_convert import load_checkpoint
from prefixquant_jax.quant.presets import get_preset
from prefixquant_jax.pipeline import QuantizeOptions, quantize
from tests.checkpoints_convert.test_hf import TOL, _ref_logits
from tests.conftest import TINY_TEXT, rng_tokens
from tests.test_cli import run_cli


def test_export_weight_only_quantized_matches_transformers(tiny_dir, tmp_path):
    from transformers import LlamaForCausalLM

    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT * 3)
    ck = load_checkpoint(tiny_dir)
    # weights-only W4: nothing is online, so the HF export computes exactly our quantized forward
    qm = quantize(ck, ck.tokenizer(), get_preset("fp", w_bits=4), QuantizeOptions(calib_data=str(text), progress=False))
    prefixquant_jax.save(qm, str(tmp_path / "q"), tokenizer=ck.tokenizer())
    r = run_cli("export-hf", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "hf"), "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["online"] == []
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = rng_tokens(30, ck.config.vocab_size, seed=3)
    ours = np.asarray(qm.model(jnp.asarray(ids[None]))[0][0])
    np.testing.assert_allclose(_ref_logits(hf, ids), ours, atol=TOL, rtol=0)
    fp = np.asarray(qm.fp_model(jnp.asarray(ids[None]))[0][0])
    assert np.abs(ours - fp).max() > 100 * TOL  # the exported weights really are the 4-bit ones
    # each kernel column holds at most 16 distinct values (int4 codes x one scale)
    w = np.asarray(hf.model.layers[0].mlp.down_proj.weight.detach().numpy())
    assert max(len(np.unique(row)) for row in w) <= 16
