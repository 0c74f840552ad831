"""Streaming safetensors load (checkpoints_convert/hf.py): tensor by tensor, bf16 kept as bf16 on request."""
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints_convert import FormatError, read_checkpoint
from checkpoints_convert.hf import _read_safetensors
from checkpoints_convert.lazy import LazyLayers
from prefixquant_jax.checkpoint.fp import load_checkpoint
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import Decoder
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
    f32 = read_checkpoint(bf16_dir)
    bf = read_checkpoint(bf16_dir, keep_dtype=True)
    assert isinstance(bf.params["layers"], LazyLayers) and bf.params["embed"].dtype == ml_dtypes.bfloat16
    q32, qbf = f32.params["layers"][0]["attn"]["q"], bf.params["layers"][0]["attn"]["q"]
    assert q32.dtype == np.float32 and qbf.dtype == ml_dtypes.bfloat16
    for a, b in zip(jax.tree.leaves(f32.params), jax.tree.leaves(bf.params)):
        np.testing.assert_array_equal(a, np.asarray(b, np.float32))  # bf16 -> f32 is exact


def test_bf16_model_from_kept_params_equals_via_float32(bf16_dir):
    """A bf16 model built from the kept bf16 params computes what one built from the float32 read does."""
    ck = load_checkpoint(bf16_dir, keep_dtype=True)
    assert ck.params["embed"].dtype == ml_dtypes.bfloat16
    toks = jnp.asarray(np.arange(3, 19, dtype=np.int32)[None])
    kept = Decoder(ck.config, ck.params, jnp.bfloat16)(toks)
    via32 = Decoder(ck.config, load_checkpoint(bf16_dir).params, jnp.bfloat16)(toks)
    np.testing.assert_array_equal(np.asarray(kept, np.float32), np.asarray(via32, np.float32))


def test_truncated_shard_is_one_line_error(bf16_dir, tmp_path):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(bf16_dir, d)
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(FormatError, match="cannot read safetensors") as e:
        read_checkpoint(str(d))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_checkpoint(str(d))
