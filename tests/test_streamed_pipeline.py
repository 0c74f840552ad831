"""Issue [L], host memory grows with the block: a safetensors checkpoint reads its layers lazily, the rotation
rotates one layer at a time, and the pipeline (calibration's FP blocks over the quantized model's arrays) gives
the numbers of the whole-model path bit for bit; training (PrefixQuant and FlatQuant) reads one FP block at a
time."""
import jax
import numpy as np

from checkpoints_convert import Checkpoint, load_checkpoint
from checkpoints_convert.hf import _read_safetensors, hf_state_to_params
from checkpoints_convert.lazy import LazyLayers, materialize, streamed
from prefixquant_jax.rotate.fuse import LazyRotation, RotationConfig, rotate_params
from tests.conftest import rng_tokens


def _equal_trees(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_layers_are_read_when_asked_for(tiny_dir):
    import glob
    import os

    ck = load_checkpoint(tiny_dir)
    layers = ck.params["layers"]
    assert isinstance(layers, LazyLayers) and len(layers) == ck.config.num_layers
    eager = hf_state_to_params(_read_safetensors(sorted(glob.glob(os.path.join(tiny_dir, "*.safetensors")))),
                               ck.config, tiny_dir)
    view = streamed(ck.params)["layers"]
    _equal_trees(view[1], eager["layers"][1])
    assert repr(layers) == "LazyLayers(2 layers, 0 read)"  # the streamed view keeps nothing
    lp = layers[0]  # a plain read keeps the layer: the params behave as the dict they stand for
    lp["mlp"]["up"] = np.zeros_like(lp["mlp"]["up"])
    assert layers[0] is lp and not view[0]["mlp"]["up"].any()
    _equal_trees(materialize(load_checkpoint(tiny_dir).params), eager)


def test_rotation_one_layer_at_a_time_is_rotate_params(tiny_dir):
    ck = load_checkpoint(tiny_dir)
    rot = RotationConfig(seed=3)
    whole, config = rotate_params(ck.params, ck.config, rot)
    lazy = LazyRotation(ck.params, ck.config, rot)
    assert lazy.config == config
    _equal_trees(materialize(lazy.params), whole)
    lazy.release()  # the matrices are rebuilt when asked for again
    _equal_trees(lazy.params["layers"][1], whole["layers"][1])


def test_calibration_fp_blocks_over_the_quantized_arrays_are_the_fp_model(tiny_dir):
    """GPTQ replaces q block l's kernels after calibrate read FP block l: the FP targets stay the FP ones."""
    from prefixquant_jax.calibrate import CalibConfig, calibrate
    from prefixquant_jax.model import Llama
    from prefixquant_jax.pipeline import _FPBlocks
    from prefixquant_jax.quant.presets import get_preset
    from prefixquant_jax.quant.recipe import QuantRecipe

    from flax import nnx

    ck = load_checkpoint(tiny_dir)
    params, config = rotate_params(ck.params, ck.config, RotationConfig(seed=0))
    preset = get_preset("w4a4kv4-static")
    recipe, fp_recipe = preset.recipe(), QuantRecipe(r3=True, r4=True)
    calib = rng_tokens(64, config.vocab_size, seed=1).reshape(2, 32)
    x = np.asarray(params["embed"][calib], np.float32)
    cfg = CalibConfig(grid_samples=1, weight_clip="mse", gptq=True)
    q_ref = Llama.from_params(config, params, recipe=recipe)
    rep_ref = calibrate(Llama.from_params(config, params, recipe=fp_recipe), q_ref, recipe, x, None, cfg, False)
    q = Llama.from_params(config, params, recipe=recipe)
    rep = calibrate(_FPBlocks(q, fp_recipe), q, recipe, x, None, cfg, False)
    assert rep == rep_ref
    _equal_trees(nnx.state(q), nnx.state(q_ref))


def test_streamed_quantize_equals_whole_checkpoint_and_builds_fp_model_on_read(tiny_dir):
    import prefixquant_jax as pq
    from prefixquant_jax.model import Llama
    from prefixquant_jax.quant.recipe import QuantRecipe

    from flax import nnx

    lazy = load_checkpoint(tiny_dir)
    whole = Checkpoint(lazy.config, materialize(load_checkpoint(tiny_dir).params), lazy.path, lazy.kind, lazy.name)
    calib = rng_tokens(96, lazy.config.vocab_size, seed=2).reshape(3, 32)
    got, want = (pq.quantize(c, calib, "w4a4kv4-static", gptq=True, grid_samples=1) for c in (lazy, whole))
    assert repr(lazy.params["layers"]).endswith("0 read)")  # the pipeline kept no layer of the checkpoint
    _equal_trees(nnx.state(got.model), nnx.state(want.model))
    _equal_trees((got.prefix_kv.k, got.prefix_kv.v), (want.prefix_kv.k, want.prefix_kv.v))
    assert "_fp_model" in got.__dict__ and not isinstance(got.__dict__["_fp_model"], Llama)  # not built yet
    params, config = rotate_params(whole.params, whole.config, RotationConfig(seed=0))
    _equal_trees(nnx.state(got.fp_model), nnx.state(Llama.from_params(config, params, recipe=QuantRecipe(r3=True, r4=True))))
    assert got.fp_model is got.fp_model  # built once


def _trained(ck, preset: str, build_fp_first: bool):
    from prefixquant_jax.pipeline import QuantizeOptions, quantize
    from prefixquant_jax.quant.presets import get_preset
    from prefixquant_jax.train import TrainConfig

    calib = rng_tokens(64, ck.config.vocab_size, seed=3).reshape(2, 32)
    tokens = rng_tokens(64, ck.config.vocab_size, seed=4).reshape(4, 16)
    cfg = TrainConfig(samples=4, seqlen=16, batch_size=2, epochs=1, lr_quant=1e-3, lr_weight=1e-4)
    opts = QuantizeOptions(grid_samples=1, weight_clip="mse", prefix_ids=(1,), progress=False)
    if not build_fp_first:
        return quantize(ck, None, get_preset(preset), opts, calib, train=cfg, train_tokens=tokens)
    from prefixquant_jax.train.finetune import train_quantized

    qm = quantize(ck, None, get_preset(preset), opts, calib)
    qm.fp_model  # built now: training then reads the whole FP model's layers
    qm.report["train"] = train_quantized(qm, tokens, cfg, progress=False)
    return qm


def test_training_reads_one_fp_block_at_a_time(tiny_dir):
    """quantize --train: the trainer's FP block l is built from the checkpoint when it trains block l (rotated
    one layer at a time), not from a whole FP model; the trained model is the one trained against the built FP
    model, bit for bit."""
    from flax import nnx

    from prefixquant_jax.pipeline import LazyFPModel

    ck = load_checkpoint(tiny_dir)
    got = _trained(ck, "w4a4kv4-static", build_fp_first=False)
    assert isinstance(got.__dict__["_fp_model"], LazyFPModel)  # never built
    assert repr(ck.params["layers"]).endswith("0 read)")
    want = _trained(load_checkpoint(tiny_dir), "w4a4kv4-static", build_fp_first=True)
    assert not isinstance(want.__dict__["_fp_model"], LazyFPModel)
    assert got.report["train"]["blocks"][0]["loss_before"] > 0
    strip = lambda blocks: [{k: v for k, v in b.items() if k != "seconds"} for b in blocks]
    assert strip(got.report["train"]["blocks"]) == strip(want.report["train"]["blocks"])
    _equal_trees(nnx.state(got.model), nnx.state(want.model))


def test_flatquant_holds_no_whole_fp_model(tiny_dir):
    """FlatQuant: channel statistics, prefix and calibration run on the quantized model's (still FP) kernels,
    training reads FP block l from the checkpoint; the same model as when training reads a built FP model."""
    from flax import nnx

    from prefixquant_jax.flatquant.pipeline import FlatOptions
    from prefixquant_jax.pipeline import LazyFPModel, QuantizeOptions, quantize
    from prefixquant_jax.quant.presets import get_preset
    from prefixquant_jax.train import TrainConfig

    ck = load_checkpoint(tiny_dir)
    got = _trained(ck, "flatquant-w4a4kv4-static-prefix", build_fp_first=False)
    assert isinstance(got.__dict__["_fp_model"], LazyFPModel)
    assert repr(ck.params["layers"]).endswith("0 read)")
    ck2 = load_checkpoint(tiny_dir)
    calib = rng_tokens(64, ck2.config.vocab_size, seed=3).reshape(2, 32)
    tokens = rng_tokens(64, ck2.config.vocab_size, seed=4).reshape(4, 16)
    cfg = TrainConfig(samples=4, seqlen=16, batch_size=2, epochs=1, lr_quant=1e-3, lr_weight=1e-4)
    opts = QuantizeOptions(grid_samples=1, weight_clip="mse", prefix_ids=(1,), progress=False,
                           flatquant=FlatOptions(train=lambda qm, groups: _train_built(qm, groups, tokens, cfg)))
    want = quantize(ck2, None, get_preset("flatquant-w4a4kv4-static-prefix"), opts, calib, train=cfg, train_tokens=tokens)
    assert not isinstance(want.__dict__["_fp_model"], LazyFPModel)
    strip = lambda blocks: [{k: v for k, v in b.items() if k != "seconds"} for b in blocks]
    assert strip(got.report["train"]["blocks"]) == strip(want.report["train"]["blocks"])
    _equal_trees(nnx.state(got.model), nnx.state(want.model))


def _train_built(qm, groups, tokens, cfg):
    """FlatOptions.train hook: the trainer on the built FP model (qm.fp_model read first)."""
    from prefixquant_jax.train.finetune import train_quantized

    qm.fp_model
    return train_quantized(qm, tokens, cfg, groups=groups, progress=False)
