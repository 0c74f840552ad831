"""FlatQuant through the pipeline: block-wise training lowers the loss; `quantize --preset flatquant-*` via the CLI."""
import json

import numpy as np
import pytest

from tests.test_cli import run_cli


def test_training_lowers_block_loss_then_merges(tiny_dir, text_file):
    from checkpoints_convert import load_checkpoint
    from prefixquant_jax.flatquant import FlatOptions, TransformBase
    from prefixquant_jax.quant.presets import get_preset
    from prefixquant_jax.pipeline import QuantizeOptions, quantize
    from prefixquant_jax.train import TrainConfig, finetune

    ck = load_checkpoint(tiny_dir)
    tok = ck.tokenizer()
    cfg = TrainConfig(samples=8, seqlen=32, batch_size=2, epochs=3)
    seen = {}

    def train(qm, groups):  # the pipeline's training step, watched: snapshot block 0 around it
        snap = lambda: {k: np.asarray(v[...]) for k, v in qm.model.layers[0].transforms.items()
                        if not isinstance(v, TransformBase)}
        before = snap()
        r = finetune(qm, tok, cfg, calib_data=text_file, groups=groups, progress=False)
        seen.update(before=before, after=snap(), groups=[g.name for g in groups])
        return r

    opts = QuantizeOptions(calib_data=text_file, calib_samples=4, calib_seqlen=32, progress=False,
                           flatquant=FlatOptions(train=train))
    qm = quantize(ck, tok, get_preset("flatquant-w4a4kv4"), opts)
    blocks = qm.report["train"]["blocks"]
    assert len(blocks) == 2 and seen["groups"] == ["clip", "transform"]
    # the report names what was trained (the weights are frozen, whatever cfg.train_weights says)
    assert qm.report["train"]["groups"] == [{"group": "clip", "lr": 5e-2}, {"group": "transform", "lr": 5e-3}]
    for b in blocks:  # mean block-output MSE over the training samples, before vs after
        assert b["loss_after"] < b["loss_before"], b
    assert min(b["loss_after"] / b["loss_before"] for b in blocks) < 0.8, blocks
    # every trained entry moved (a symmetric LAC site may only ever clip with one of its two logits)
    still = [k for k in seen["before"] if np.array_equal(seen["before"][k], seen["after"][k])]
    other = lambda k: k[:-3] + ("min" if k.endswith("max") else "max")
    assert all(k.startswith("lac_") and other(k) not in still for k in still), still
    b0 = qm.model.layers[0]
    assert b0.recipe.merged and "q" in b0.qparams and not any(k.startswith("lwc_") for k in b0.transforms)
    assert all(0 < c < 1e3 for c in qm.report["flatquant"]["max_condition"].values())


@pytest.mark.slow  # a full CLI FlatQuant run (~1.5 min); test_training_lowers_block_loss_then_merges covers the pipeline by default
def test_cli_flatquant_preset(tiny_dir, text_file, tmp_path):
    out = tmp_path / "q.json"
    r = run_cli("quantize", "--preset", "flatquant-w4a4kv4", "--model", tiny_dir, "--calib-data", text_file,
                "--calib-samples", "4", "--calib-seqlen", "32", "--eval-data", text_file, "--seqlen", "32",
                "--max-windows", "1", "--train-samples", "4", "--train-seqlen", "32", "--train-batch-size", "2",
                "--epochs", "1", "--no-fp", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["preset"] == "flatquant-w4a4kv4" and res["prefix_ids"] == []
    assert res["ppl"] > 1 and res["windows"] == 1
    assert len(res["report"]["train"]["blocks"]) == 2 and res["report"]["flatquant"]["merged"]
    assert "fine-tuned 2 blocks" in r.stdout
