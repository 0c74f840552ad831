"""benchmarks/memory_blocks.py: the block size it checks against, and its RSS wrapper (peak, kill at the limit)."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import memory_blocks  # noqa: E402


def test_block_params_are_a_llama3_8b_block():
    from checkpoints_convert.hf import expected_shapes
    from prefixquant_jax.nn.config import ModelConfig

    c = memory_blocks.hf_config(1, 4096)
    config = ModelConfig.from_hf_dict(c, source="memory_blocks")  # a config our model takes
    assert (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
        4096, 14336, 32, 8, 128)
    layer = expected_shapes(c)["layers"][0]  # the checkpoints_convert leaf reads the HF dict itself
    n = sum(math.prod(s) for s in (layer["input_norm"], layer["post_norm"],
                                                      *layer["attn"].values(), *layer["mlp"].values()))
    assert memory_blocks.block_params(c) == n == 218_112_000


def _wrap(limit_gib, code):
    r = subprocess.run([sys.executable, "-c", memory_blocks._WRAPPER, str(limit_gib), sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_wrapper_reports_the_child_peak_and_kills_at_the_limit():
    grow = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); time.sleep(1.0)"
    ok = _wrap(4.0, grow)
    assert ok["rc"] == 0 and not ok["killed"] and ok["peak_rss_kib"] * 1024 > 300 * 2**20
    killed = _wrap(0.1, grow)
    assert killed["killed"] and killed["rc"] != 0
