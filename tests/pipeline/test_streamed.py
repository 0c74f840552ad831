"""Issue [L], host memory grows with the block: a safetensors checkpoint reads its layers lazily, the rotation
rotates one layer at a time, and the pipeline (calibration's FP blocks over the quantized model's arrays) gives
the numbers of the whole-model path bit for bit; training (PrefixQuant and FlatQuant) reads one FP block at a
time (pipeline/fp_blocks.py)."""
import jax
import numpy as np
import pytest
from flax import nnx

import prefixquant_jax as pq
from checkpoints_convert.hf import _read_safetensors, hf_state_to_params, read_config
from checkpoints_convert.lazy import LazyLayers, materialize, streamed
from prefixquant_jax.checkpoint.fp import Checkpoint, load_checkpoint
from prefixquant_jax.rotate.fuse import LazyRotation, RotationConfig, rotate_params
from tests.conftest import TINY_CALIB, TINY_TRAIN, rng_tokens


def _equal_trees(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _strip(blocks):
    return [{k: v for k, v in b.items() if k != "seconds"} for b in blocks]


def test_checkpoint_layers_are_read_when_asked_for(tiny_dir):
    import glob
    import os

    ck = load_checkpoint(tiny_dir)
    layers = ck.params["layers"]
    assert isinstance(layers, LazyLayers) and len(layers) == ck.config.num_layers
    eager = hf_state_to_params(_read_safetensors(sorted(glob.glob(os.path.join(tiny_dir, "*.safetensors")))),
                               read_config(tiny_dir), tiny_dir)
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
    """GPTQ replaces q block l's kernels after calibrate read FP block l (FPBlocks.of_model): the FP targets stay
    the FP ones, those of a separate FP model."""
    from prefixquant_jax.nn.decoder import Decoder
    from prefixquant_jax.pipeline.calibrate import calibrate
    from prefixquant_jax.pipeline.fp_blocks import FPBlocks

    ck = load_checkpoint(tiny_dir)
    params, config = rotate_params(ck.params, ck.config, RotationConfig(seed=0))
    recipe = pq.preset("w4a4kv4-static")
    fp_recipe = recipe.fp_reference()
    calib = rng_tokens(64, config.vocab_size, seed=1).reshape(2, 32)
    x = np.asarray(params["embed"][calib], np.float32)
    opts = pq.QuantizeOptions(grid_samples=1, gptq=True, progress=False)
    run = lambda fp_blocks, q: calibrate(fp_blocks, q, x, opts, weight_clip="mse", static=True, progress=False)
    q_ref = Decoder(config, params, recipe=recipe)
    rep_ref = run(FPBlocks.of_model(Decoder(config, params, recipe=fp_recipe), fp_recipe), q_ref)
    q = Decoder(config, params, recipe=recipe)
    rep = run(FPBlocks.of_model(q, fp_recipe), q)
    assert rep == rep_ref and "weights" in rep[0]
    _equal_trees(nnx.state(q), nnx.state(q_ref))


def test_streamed_quantize_equals_whole_checkpoint(tiny_quantized, tiny_ck):
    """The lazy checkpoint (tiny_ck; the prefix detected, GPTQ) quantizes as the same checkpoint read whole."""
    assert isinstance(tiny_ck.params["layers"], LazyLayers)
    got = tiny_quantized("w4a4kv4-static", prefix_ids=None, gptq=True, grid_samples=1)
    whole = Checkpoint(tiny_ck.config, materialize(streamed(tiny_ck.params)), tiny_ck.path, tiny_ck.kind, tiny_ck.name)
    want = pq.quantize(whole, TINY_CALIB, "w4a4kv4-static", gptq=True, grid_samples=1)
    assert "source" not in got.report["outliers"] and got.prefix_len > 0  # detected, not given
    assert got.report["prefix_ids"] == want.report["prefix_ids"]
    _equal_trees(nnx.state(got.model), nnx.state(want.model))
    _equal_trees((got.prefix_kv.k, got.prefix_kv.v), (want.prefix_kv.k, want.prefix_kv.v))
    assert got.fp_blocks is None  # nothing of the FP model is kept without training


def test_training_reads_one_fp_block_at_a_time(tiny_quantized, tiny_dir):
    """quantize(train=...): the trainer's FP block l is built from the checkpoint when it trains block l (rotated
    one layer at a time), not from a whole FP model; the trained model is the one trained against the built FP
    model, bit for bit; FPBlocks.model() is that FP model."""
    from prefixquant_jax.nn.decoder import Decoder
    from prefixquant_jax.pipeline.finetune import train_quantized
    from prefixquant_jax.pipeline.fp_blocks import FPBlocks
    from tests.pipeline.helpers import copy_model

    ck = load_checkpoint(tiny_dir)
    tokens = rng_tokens(64, ck.config.vocab_size, seed=4).reshape(4, 16)
    cfg = pq.TrainConfig(samples=4, seqlen=16, batch_size=2, epochs=1, lr_quant=1e-3, lr_weight=1e-4)
    plain = tiny_quantized("w4a4kv4-static")  # untrained: the start both trainings share (copied below)
    got = pq.quantize(ck, TINY_CALIB, "w4a4kv4-static", prefix_ids=(1,), train=cfg, train_tokens=tokens)
    assert repr(ck.params["layers"]).endswith("0 read)")  # the pipeline kept no layer of the checkpoint
    layers = got.fp_blocks.params["layers"]
    assert isinstance(layers, LazyLayers) and repr(layers).endswith("0 read)")  # rotated when asked for
    assert got.report["train"]["blocks"][0]["loss_before"] > 0

    params, config = rotate_params(materialize(ck.params), ck.config, RotationConfig(seed=0))
    fp_recipe = got.recipe.fp_reference()
    fp_model = Decoder(config, params, recipe=fp_recipe, prefix=got.prefix_kv)  # the whole FP model, built
    _equal_trees(nnx.state(got.fp_blocks.model()), nnx.state(fp_model))
    want = plain.replace(model=copy_model(plain.model), fp_blocks=FPBlocks.of_model(fp_model, fp_recipe))
    rep = train_quantized(want, tokens, cfg, progress=False)
    assert _strip(got.report["train"]["blocks"]) == _strip(rep["blocks"])
    _equal_trees(nnx.state(got.model), nnx.state(want.model))


@pytest.mark.slow  # two FlatQuant quantize + train runs (~1 min on 2 cores); by default the same FP-block reading
# is checked for PrefixQuant by test_training_reads_one_fp_block_at_a_time (one trainer for both methods)
def test_flatquant_holds_no_whole_fp_model(tiny_quantized, tiny_dir):
    """FlatQuant: channel statistics, prefix and calibration run on the quantized model's (still FP) kernels,
    training reads FP block l from the checkpoint; the same model as when training (its FlatOptions.train hook)
    reads a whole FP model built first."""
    from prefixquant_jax.pipeline.finetune import train_quantized
    from prefixquant_jax.pipeline.fp_blocks import FPBlocks

    got = tiny_quantized("flatquant-w4a4kv4-static-prefix")
    assert isinstance(got.fp_blocks.params["layers"], LazyLayers)  # the checkpoint's, streamed
    cfg = pq.TrainConfig(**TINY_TRAIN)

    def train_built(qm, groups):  # the trainer against a whole FP model, built first
        whole = qm.fp_blocks.model()
        built = qm.replace(fp_blocks=FPBlocks.of_model(whole, qm.fp_blocks.recipe))
        return train_quantized(built, TINY_CALIB, cfg, groups=groups, progress=False)

    ck = load_checkpoint(tiny_dir)
    want = pq.quantize(ck, TINY_CALIB, "flatquant-w4a4kv4-static-prefix", train=cfg, prefix_ids=(1,),
                       flatquant=pq.FlatOptions(train=train_built))
    assert repr(ck.params["layers"]).endswith("0 read)")  # the pipeline kept no layer of the checkpoint
    assert _strip(got.report["train"]["blocks"]) == _strip(want.report["train"]["blocks"])
    assert got.report["flatquant"]["merged"] and want.report["flatquant"]["merged"]
    _equal_trees(nnx.state(got.model), nnx.state(want.model))
