"""FlatQuant through the pipeline: block-wise training lowers the loss; `quantize --preset flatquant-*` via the CLI."""
import json

import numpy as np
import pytest
from flax import nnx

from tests.cli.util import main_cli


def _trained_entries(t, path=()):
    """{(site or linear, key[, sub-key]): array} of a block's transforms, the frozen FactorBase left out."""
    from prefixquant_jax.flatquant.transforms import FactorBase

    out = {}
    for key in t:
        v = t[key]
        if isinstance(v, nnx.Variable):
            if not isinstance(v, FactorBase):
                out[path + (key,)] = np.asarray(v[...])
        else:
            out.update(_trained_entries(v, path + (key,)))
    return out


def test_training_lowers_block_loss_then_merges(tiny_ck):
    import prefixquant_jax as pq
    from prefixquant_jax.eval.data import calibration_samples, tokenize
    from prefixquant_jax.nn.decoder import WEIGHT_NAMES
    from prefixquant_jax.pipeline.finetune import train_quantized
    from prefixquant_jax.quant.recipe import QUANT_SITES
    from tests.conftest import TINY_TEXT, tiny_tokenizer

    ids = tokenize(tiny_tokenizer(), TINY_TEXT * 3)
    calib = calibration_samples(ids, 4, 16, 0)
    cfg = pq.TrainConfig(samples=4, seqlen=16, batch_size=2, epochs=3)
    train_tokens = calibration_samples(ids, cfg.samples, cfg.seqlen, cfg.seed)
    seen = {}

    def train(qm, groups):  # the pipeline's training step, watched: snapshot block 0 around it
        snap = lambda: _trained_entries(qm.model.layers[0].transforms)  # noqa: E731
        before = snap()
        r = train_quantized(qm, train_tokens, cfg, groups=groups, progress=False)
        seen.update(before=before, after=snap(), groups=[g.name for g in groups])
        return r

    qm = pq.quantize(tiny_ck, calib, "flatquant-w4a4kv4", train=cfg, flatquant=pq.FlatOptions(train=train))
    blocks = qm.report["train"]["blocks"]
    assert len(blocks) == 2 and seen["groups"] == ["clip", "transform"]
    # the report names what was trained (the weights are frozen, whatever cfg.train_weights says)
    assert qm.report["train"]["groups"] == [{"group": "clip", "lr": 5e-2}, {"group": "transform", "lr": 5e-3}]
    for b in blocks:  # mean block-output MSE over the training samples, before vs after
        assert b["loss_after"] < b["loss_before"], b
    assert min(b["loss_after"] / b["loss_before"] for b in blocks) < 0.8, blocks
    # every trained entry moved (a symmetric LAC site may only ever clip with one of its two logits)
    assert {k[0] for k in seen["before"]} >= {"qkv_in", "o_in", "k_cache", "v_cache", *WEIGHT_NAMES}
    still = [k for k in seen["before"] if np.array_equal(seen["before"][k], seen["after"][k])]
    other = {"clip_min": "clip_max", "clip_max": "clip_min"}
    assert all(len(k) == 2 and k[0] in QUANT_SITES and k[1] in other and (k[0], other[k[1]]) not in still
               for k in still), still
    b0 = qm.model.layers[0]
    assert b0.recipe.merged and "q" in b0.qparams and not any(n in b0.transforms for n in WEIGHT_NAMES)  # LWC folded
    assert all(0 < c < 1e3 for c in qm.report["flatquant"]["max_condition"].values())


@pytest.mark.slow  # a full CLI FlatQuant run (~1.5 min); test_training_lowers_block_loss_then_merges covers the pipeline by default
def test_cli_flatquant_preset(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q.json"
    r = main_cli(capsys, "quantize", "--preset", "flatquant-w4a4kv4", "--model", tiny_dir, "--calib-data", text_file,
                 "--calib-samples", "4", "--calib-seqlen", "32", "--eval-data", text_file, "--seqlen", "32",
                 "--max-windows", "1", "--train-samples", "4", "--train-seqlen", "32", "--train-batch-size", "2",
                 "--epochs", "1", "--no-fp", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["recipe"] == "flatquant-w4a4kv4" and res["prefix_ids"] == []
    assert res["ppl"] > 1 and res["windows"] == 1
    assert len(res["report"]["train"]["blocks"]) == 2 and res["report"]["flatquant"]["merged"]
    assert "fine-tuned 2 blocks" in r.stdout
