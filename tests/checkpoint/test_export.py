"""checkpoint/export.py: HF exports load in transformers with our logits. A weight-only W4 quantized model
saved, then `export-hf` (CLI): nothing online, the 4-bit weights themselves; an R1/R2-rotated FP export
(export_rotated_hf): the rotated model's logits and the original's."""
import json

import jax.numpy as jnp
import numpy as np
import torch

import prefixquant_jax as pq
from tests.cli.util import main_cli
from tests.conftest import make_tiny_hf, rng_tokens

TOL = 1e-4  # max abs logit difference vs transformers fp32


def ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()


def test_export_weight_only_quantized_matches_transformers(tiny_quantized, tiny_ck, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from prefixquant_jax.nn.decoder import Decoder

    # weights-only W4: nothing is online, so the HF export computes exactly our quantized forward
    qm = tiny_quantized(pq.preset("fp", w_bits=4))
    pq.save(qm, str(tmp_path / "q"), tokenizer=tiny_ck.tokenizer())
    r = main_cli(capsys, "export-hf", "--model", tmp_path / "q", "--out", tmp_path / "hf", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["online"] == [] and res["quantized"]
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = rng_tokens(30, tiny_ck.config.vocab_size, seed=3)
    ours = np.asarray(qm.model(jnp.asarray(ids[None]))[0])
    np.testing.assert_allclose(ref_logits(hf, ids), ours, atol=TOL, rtol=0)
    fp = np.asarray(Decoder(tiny_ck.config, tiny_ck.params)(jnp.asarray(ids[None]))[0])
    assert np.abs(ours - fp).max() > 100 * TOL  # the exported weights really are the 4-bit ones
    # each output row of a weight holds at most 16 distinct values (int4 codes x one scale)
    w = np.asarray(hf.model.layers[0].mlp.down_proj.weight.detach().numpy())
    assert max(len(np.unique(row)) for row in w) <= 16


def test_export_rotated_loads_in_transformers(tmp_path):
    """An R1/R2-rotated export loads in transformers and gives our rotated model's logits (and the original's)."""
    from transformers import LlamaForCausalLM

    from prefixquant_jax.checkpoint.export import export_rotated_hf
    from prefixquant_jax.nn.decoder import Decoder
    from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params

    ref = make_tiny_hf(tmp_path / "src", tied=True, tokenizer=False)
    ck = pq.load_checkpoint(str(tmp_path / "src"))
    export_rotated_hf(ck.params, ck.config, str(tmp_path / "rot"), seed=7)
    cfg = json.loads((tmp_path / "rot" / "config.json").read_text())
    assert cfg["prefixquant"]["seed"] == 7 and cfg["tie_word_embeddings"] is False
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "rot").eval()
    params, config = rotate_params(ck.params, ck.config, RotationConfig(r3=False, r4=False, seed=7))
    ids = rng_tokens(30, ck.config.vocab_size, seed=5)
    ours = Decoder(config, params)(jnp.asarray(ids[None]))
    np.testing.assert_allclose(ref_logits(hf, ids), np.asarray(ours[0]), atol=TOL, rtol=0)
    np.testing.assert_allclose(ref_logits(hf, ids), ref_logits(ref, ids), atol=2e-4, rtol=0)
    # the weights really are rotated, not a copy
    assert not np.allclose(np.asarray(params["embed"]), ck.params["embed"])
