"""Block-wise trainer (prefixquant_jax/pipeline/train.py, finetune.py, train_dir.py): loss goes down, two
learning-rate groups, kill-and-resume, data parallel, the training directory's format and fingerprint."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.errors import UserError
from prefixquant_jax.pipeline.finetune import train_quantized
from prefixquant_jax.pipeline.train import BlockTrainer, prefixquant_groups
from tests.cli.util import assert_one_line_error, main_cli
from tests.pipeline.helpers import trainable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def text_tokens(ck, text_file, samples: int, seqlen: int) -> np.ndarray:
    """samples x seqlen tokens of the text, drawn as the CLI draws its calibration / training samples (seed 0)."""
    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize

    return calibration_samples(tokenize(ck.tokenizer(), load_text(text_file)), samples, seqlen, 0)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def resumed(tiny_quantized, tiny_ck, text_file, tmp_path_factory):
    """Three trainings of copies of the shared w4a4kv4-static model on 8 x 32 tokens of the text (8 steps per
    block, an in-block checkpoint every 2): uninterrupted; checkpointed and interrupted right after block 1's
    first in-block checkpoint; resumed from that directory. {name: (QuantizedModel, train report)}."""
    from prefixquant_jax.pipeline.train_dir import TrainDir

    tokens = text_tokens(tiny_ck, text_file, 8, 32)
    cfg = pq.TrainConfig(samples=8, seqlen=32, batch_size=2, epochs=2, lr_quant=1e-3, lr_weight=1e-4, ckpt_every=2)
    d = str(tmp_path_factory.mktemp("train") / "run")
    out = {}
    runs = (("ref", None), ("cut", pq.TrainCheckpoint(dir=d)), ("resumed", pq.TrainCheckpoint(dir=d, resume=True)))
    for name, ckpt in runs:
        qm = trainable(tiny_ck, tiny_quantized("w4a4kv4-static"))
        if name != "cut":
            out[name] = (qm, train_quantized(qm, tokens, cfg, checkpoint=ckpt, progress=False))
            continue
        save = TrainDir.save_inblock

        def save_then_stop(self, layer, step, tree):
            save(self, layer, step, tree)
            if layer == 1:
                raise Interrupted(step)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TrainDir, "save_inblock", save_then_stop)
            with pytest.raises(Interrupted):
                train_quantized(qm, tokens, cfg, checkpoint=ckpt, progress=False)
        meta = json.loads(open(os.path.join(d, "train.json")).read())
        assert len(meta["blocks"]) == 1 and os.listdir(os.path.join(d, "inblock")) == [str(1_000_000 + 2)]
    return out


def test_loss_decreases(resumed):
    _, r = resumed["ref"]
    assert len(r["blocks"]) == 2
    assert r["groups"] == [{"group": "quant", "lr": 1e-3}, {"group": "weight", "lr": 1e-4}]
    for b in r["blocks"]:  # mean MSE over all training samples, before vs after
        assert b["loss_after"] < 0.9 * b["loss_before"], b


def test_resume_inside_a_block_is_bit_identical(resumed):
    """Calibrated scales (init/), block 0 (blocks/0) and block 1's running state with Adam's (inblock/) restored:
    the resumed run is the uninterrupted one, bit for bit."""
    from flax import nnx

    (ref, r_ref), (got, r_got) = resumed["ref"], resumed["resumed"]
    strip = lambda blocks: [{k: v for k, v in b.items() if k != "seconds"} for b in blocks]
    assert strip(r_got["blocks"]) == strip(r_ref["blocks"])
    a, b = nnx.state(got.model), nnx.state(ref.model)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_lr_groups_step_sizes(tiny_quantized, tiny_ck):
    """Adam's first step moves every parameter with a non-negligible gradient by ~lr of its group."""
    from prefixquant_jax.pipeline.blocks import BlockRunner

    qm = trainable(tiny_ck, tiny_quantized("w4a4kv4-static"))  # a copy (arrays too): the step donates them
    cfg = pq.TrainConfig(samples=4, seqlen=32, batch_size=2, epochs=1, lr_quant=1e-3, lr_weight=1e-5)
    runner = BlockRunner(qm.config, qm.prefix_len, 32)
    trainer = BlockTrainer(runner, prefixquant_groups(cfg), cfg)
    gd, train, rest = trainer.split(qm.model.layers[0])
    before = jax.tree.map(np.array, train)
    x = np.random.default_rng(0).normal(size=(2, 32, qm.config.hidden_size)).astype(np.float32)
    target = runner.forward(qm.fp_blocks[0], x, 2)
    xb, tb = trainer.batch(x, target, np.arange(2))
    opt = trainer.tx.init(train)
    new, _, _ = trainer.step(gd, train, opt, rest, xb, runner.cos, runner.sin, tb)
    for group, lr in zip(range(2), (cfg.lr_quant, cfg.lr_weight)):
        d = np.concatenate([np.abs(np.asarray(a) - b).ravel() for a, b in zip(jax.tree.leaves(new[group]), jax.tree.leaves(before[group]))])
        # |step| = lr * |g| / (|g| + eps): ~lr where the gradient dwarfs Adam's eps, never above lr
        assert (d > 0.01 * lr).mean() > 0.5
        assert np.percentile(d, 99) == pytest.approx(lr, rel=0.05), (group, np.percentile(d, 99))
        assert d.max() <= lr * 1.001


def _train_args(tiny_dir, text_file, *extra):
    return ["quantize", "--model", tiny_dir, "--preset", "w4a4kv4-static", "--calib-data", text_file,
            "--calib-samples", "4", "--calib-seqlen", "32", "--outlier-samples", "4", "--eta", "4", "--no-eval",
            "--train", "--train-samples", "8", "--train-seqlen", "32", "--epochs", "12", "--train-batch-size", "2",
            "--lr-quant", "1e-3", "--lr-weight", "1e-4", *extra]


def _restore_blocks(train_dir):
    import orbax.checkpoint as ocp
    c = ocp.StandardCheckpointer()
    return {b: c.restore(os.path.join(train_dir, "blocks", b)) for b in sorted(os.listdir(os.path.join(train_dir, "blocks")))}


@pytest.mark.slow  # three quantize + train runs through the CLI, one a subprocess (~1.5 min on 2 cores); by
# default test_resume_inside_a_block_is_bit_identical checks the same restore (interrupted in this process)
def test_kill_and_resume_is_bit_identical(tiny_dir, text_file, tmp_path, capsys):
    """`quantize --train --ckpt-every 4` SIGKILLed inside block 1 (a subprocess), then `--resume`d: the blocks
    of the uninterrupted run, bit for bit (the reference and the resume run in this process)."""
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    r = main_cli(capsys, *_train_args(tiny_dir, text_file, "--train-dir", ref_dir))  # checkpoints per block only
    assert r.returncode == 0, r.stderr[-2000:]
    # the same run, SIGKILLed once block 1 has an in-block checkpoint (block 0 finished)
    cmd = [sys.executable, "-m", "prefixquant_jax.cli.main",
           *_train_args(tiny_dir, text_file, "--ckpt-every", "4", "--train-dir", str(cut_dir))]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    inblock = cut_dir / "inblock"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if inblock.is_dir() and any(n.startswith("1000") and n.isdigit() for n in os.listdir(inblock)):
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut_dir / "blocks" / "1").exists()  # killed inside block 1
    r = main_cli(capsys, *_train_args(tiny_dir, text_file, "--ckpt-every", "4", "--resume", cut_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    ref, cut = _restore_blocks(ref_dir), _restore_blocks(cut_dir)
    assert ref.keys() == cut.keys() == {"0", "1"}
    for b in ref:
        for k in ref[b]:
            np.testing.assert_array_equal(np.asarray(ref[b][k]), np.asarray(cut[b][k]), err_msg=f"block {b} leaf {k}")
    logs = [json.load(open(d / "train.json"))["blocks"] for d in (ref_dir, cut_dir)]
    assert [b["loss_after"] for b in logs[0]] == [b["loss_after"] for b in logs[1]]


def test_train_dir_exists_needs_resume(tiny_dir, text_file, tmp_path, capsys):
    d = tmp_path / "td"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    assert_one_line_error(main_cli(capsys, *_train_args(tiny_dir, text_file, "--train-dir", d)), "--resume")
    assert (d / "keep.txt").read_text() == "mine"


def two_device_losses(tiny_dir: str, text_file: str) -> dict:
    """{"devices", "frozen", "weights": per-block losses} of w4a4kv4-dynamic trained with the weights frozen and
    trained, the batch over every jax device (tests/pipeline/test_train.py runs it on 1 and on 2 devices)."""
    ck = pq.load_checkpoint(tiny_dir)
    calib, tokens = text_tokens(ck, text_file, 4, 32), text_tokens(ck, text_file, 8, 32)
    out = {"devices": jax.device_count()}
    for name, train_weights in (("frozen", False), ("weights", True)):
        cfg = pq.TrainConfig(samples=8, seqlen=32, batch_size=4, epochs=2, lr_quant=1e-3, lr_weight=1e-4,
                             train_weights=train_weights)
        qm = pq.quantize(ck, calib, "w4a4kv4-dynamic", train=cfg, train_tokens=tokens, outlier_samples=4, eta=4)
        out[name] = qm.report["train"]["blocks"]
    return out


@pytest.mark.slow  # a subprocess and four quantize + train runs (~1.5 min); the trainer's batch sharding over a
# (data, model) mesh is covered by default in tests/parallel/test_sharding_blocks.py
def test_two_host_devices_same_loss(tiny_dir, text_file):
    """The batch sharded over 2 forced host devices (a subprocess) gives this process's 1-device losses within
    1e-5 (relative).

    Exception, measured: with the weights trained too, block 1's loss after training differs by ~0.4 %. Its
    inputs (block 0's trained outputs) differ by fp32 reduction order (~1e-7), and a weight code that sits at a
    rounding tie (straight-through round(w / s)) can then flip: a discrete jump that 4 Adam steps carry on.
    With the weights frozen every loss agrees within 1e-5, and block 0 (identical inputs) always does."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    code = ("import json; from tests.pipeline.test_train import two_device_losses; "
            f"print(json.dumps(two_device_losses({tiny_dir!r}, {text_file!r})))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = {2: json.loads(r.stdout.strip().splitlines()[-1]), 1: two_device_losses(tiny_dir, text_file)}
    assert out[1]["devices"] == 1 and out[2]["devices"] == 2
    close = lambda a, b, rel: a == pytest.approx(b, rel=rel, abs=1e-12)
    for run in ("frozen", "weights"):
        for a, b in zip(out[1][run], out[2][run], strict=True):
            for k in ("loss_before", "loss_after"):
                rel = 2e-2 if (run, a["layer"], k) == ("weights", 1, "loss_after") else 1e-5
                assert close(a[k], b[k], rel), (run, k, a, b)


def test_resume_needs_the_same_recipe(tmp_path):
    """The fingerprint holds the recipe (quant.serial.encode, as train_quantized writes it): the same one resumes,
    another is refused (a preset with another bit width; a raw recipe with other weights)."""
    from prefixquant_jax.pipeline.train_dir import TrainDir
    from prefixquant_jax.quant.serial import encode
    from prefixquant_jax.quant.spec import QuantSpec
    from tests.test_api import MIXED

    for i, (recipe, other) in enumerate(((pq.preset("w4a4kv4-static"), pq.preset("w4a4kv4-static", a_bits=8)),
                                         (MIXED, MIXED.replace(weight=QuantSpec(bits=4, granularity="channel"))))):
        d = str(tmp_path / str(i))
        now = {"recipe": encode(recipe), "prefix_ids": [], "model": "m"}
        TrainDir(d, now, resume=False).close()
        TrainDir(d, {"recipe": encode(recipe), "prefix_ids": [], "model": "m"}, resume=True).close()
        with pytest.raises(UserError, match="differs in recipe"):
            TrainDir(d, {**now, "recipe": encode(other)}, resume=True)


def test_a_training_directory_of_the_old_format_is_refused(tmp_path):
    """Format "prefixquant-train/1" (before the recipes): one line, naming both formats; the directory is left."""
    from prefixquant_jax.pipeline.train_dir import FORMAT, TrainDir

    meta = {"format": "prefixquant-train/1", "fingerprint": {"preset": {"name": "w4a4kv4-static"}, "model": "m"},
            "blocks": []}
    (tmp_path / "train.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        TrainDir(str(tmp_path), {"model": "m"}, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "prefixquant-train/1" in msg and FORMAT in msg, msg
    assert json.loads((tmp_path / "train.json").read_text()) == meta


def test_quantizer_variables_typed_clamp_and_qparams_tree():
    """The projection clamps Scale variables positive and leaves ZeroPoint alone (selected by type); a training
    directory's post-calibration tree (qparams_tree) sets every quantizer back (set_qparams)."""
    import types

    import jax.numpy as jnp
    from flax import nnx

    from prefixquant_jax.pipeline.finetune import qparams_tree, set_qparams
    from prefixquant_jax.pipeline.train import MIN_SCALE, positive_quant_scales

    st = nnx.State({"k_cache": {"scale": pq.Scale(jnp.asarray([-1.0, 2.0])), "zero": pq.ZeroPoint(jnp.asarray([-3.0, 4.0]))}})
    out = jax.jit(positive_quant_scales)(st)
    np.testing.assert_array_equal(np.asarray(out["k_cache"]["scale"][...]), np.float32([MIN_SCALE, 2.0]))
    np.testing.assert_array_equal(np.asarray(out["k_cache"]["zero"][...]), [-3.0, 4.0])

    got = {}
    blk = types.SimpleNamespace(set_quantizer=lambda where, scale, zero=None: got.update({where: (scale, zero)}))
    tree = {"0": {"q": {"scale": np.ones((1, 4))}, "k_cache": {"scale": np.ones((2, 1)), "zero": np.full((2, 1), 8.0)},
                  "qkv_in": {"scale": np.ones((1, 1))}}}
    set_qparams(types.SimpleNamespace(layers=[blk]), tree)
    assert sorted(got) == ["k_cache", "q", "qkv_in"]
    assert got["q"][1] is None and got["qkv_in"][1] is None and float(got["k_cache"][1][0, 0]) == 8.0
    assert all(a.dtype == jnp.float32 for s, z in got.values() for a in (s, z) if a is not None)
    back = qparams_tree(types.SimpleNamespace(layers=[types.SimpleNamespace(qparams={
        w: {f: pq.Scale(jnp.asarray(a)) for f, a in q.items()} for w, q in tree["0"].items()})]))
    assert jax.tree.map(np.shape, back) == jax.tree.map(np.shape, tree)
