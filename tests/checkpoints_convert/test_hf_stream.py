"""Streaming safetensors load (checkpoints_convert/hf.py): tensor by tensor, bf16 kept as bf16 on request."""
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints_convert import load_checkpoint
from checkpoints_convert.hf import _read_safetensors
from prefixquant_jax.errors import UserError
from tests.conftest import make_tiny_hf


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """The tiny model saved as a bf16 checkpoint in two safetensors shards (as HF saves a bf16 model)."""
    import torch

    path = tmp_path_factory.mktemp("bf16")
    model = make_tiny_hf(path)
    os.remove(path / "model.safetensors")
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    return str(path)


def test_stream_reads_one_tensor_at_a_time_in_checkpoint_dtype(bf16_dir):
    files = sorted(str(p) for p in pathlib.Path(bf16_dir).glob("*.safetensors"))
    stream = _read_safetensors(files)
    name, t = next(stream)  # a generator: nothing beyond this tensor has been read
    assert isinstance(name, str) and t.dtype == ml_dtypes.bfloat16
    assert sum(1 for _ in stream) > 10


def test_keep_dtype_is_bf16_with_the_float32_values(bf16_dir):
    f32 = load_checkpoint(bf16_dir)
    bf = load_checkpoint(bf16_dir, keep_dtype=True)
    q32, qbf = f32.params["layers"][0]["attn"]["q"], bf.params["layers"][0]["attn"]["q"]
    assert q32.dtype == np.float32 and qbf.dtype == ml_dtypes.bfloat16
    for a, b in zip(jax.tree.leaves(f32.params), jax.tree.leaves(bf.params)):
        np.testing.assert_array_equal(a, np.asarray(b, np.float32))  # bf16 -> f32 is exact


def test_bf16_model_from_kept_params_equals_via_float32(bf16_dir):
    """The bf16 eval path (loading.load_fp with dtype bfloat16 keeps the checkpoint dtype) computes the same logits."""
    from prefixquant_jax.compiled import Compiled
    from prefixquant_jax.loading import load_fp
    from prefixquant_jax.model import Llama

    ck, model = load_fp(bf16_dir, jnp.bfloat16)
    assert ck.params["embed"].dtype == ml_dtypes.bfloat16
    ref = Llama.from_params(ck.config, load_checkpoint(bf16_dir).params, jnp.bfloat16)
    toks = np.arange(3, 19, dtype=np.int32)[None]
    out = [np.asarray(c.logits(c.state, toks, c.cache(1, 16), 0)[0]) for c in (Compiled(model), Compiled(ref))]
    np.testing.assert_array_equal(out[0], out[1])


def test_truncated_shard_is_one_line_error(bf16_dir, tmp_path):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(bf16_dir, d)
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_checkpoint(str(d))
