"""`prefixquant plan` (prefixquant_jax/plan.py): per-device bytes from jax.eval_shape, checked against the arrays a
real 2 x 2 mesh holds (a 4-host-device subprocess): the FP model eval --mesh loads, the fake-quant model and its
KV cache, the packed int4 runtime model and its integer cache, byte for byte on every device."""
import json
import math
import os

import pytest

from tests.four_devices import run_worker, write_results
from tests.test_cli import assert_one_line_error, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _device_bytes(tree) -> list[int]:
    """Bytes each device holds of the jax arrays of `tree`, in device order."""
    import jax

    per = {}
    for a in jax.tree.leaves(tree):
        for sh in a.addressable_shards:
            per[sh.device.id] = per.get(sh.device.id, 0) + sh.data.nbytes
    return [per[k] for k in sorted(per)]


def worker(model_dir: str, out: str) -> None:
    import jax
    import numpy as np

    from checkpoints_convert import load_checkpoint
    from prefixquant_jax.compiled import Compiled
    from prefixquant_jax.loading import load_fp
    from prefixquant_jax.pipeline import QuantizeOptions, quantize
    from prefixquant_jax.plan import PlanOptions, plan
    from prefixquant_jax.quant.presets import get_preset
    from prefixquant_jax.runtime import RealCompiled, pack
    from prefixquant_jax.sharding import MeshSpec, shard

    assert len(jax.devices()) == 4
    spec = MeshSpec.parse("data=2,model=2")
    res = {}
    fp = Compiled(load_fp(model_dir, mesh=spec)[1])  # eval --mesh: weights from the host onto the mesh
    res["load"] = _device_bytes(fp.state)
    ck = load_checkpoint(model_dir)
    opts = QuantizeOptions(prefix_ids=(1,), progress=False, calibrate=False)
    qm = quantize(ck, None, get_preset("w4a4kv4-dynamic"), opts, calib_tokens=np.full((1, 16), 5, np.int32))
    fake = shard(Compiled(qm.model), spec)
    res["eval"] = _device_bytes(fake.state)
    res["eval_kv"] = _device_bytes(fake.cache(2, 1 + 16, qm.prefix_kv))
    real = shard(RealCompiled(pack(qm, backend="xla", dtype=jax.numpy.bfloat16)), spec)
    res["runtime"] = _device_bytes(real.state)
    res["runtime_kv"] = _device_bytes(real.cache(2, 1 + 16, qm.prefix_kv))
    p = plan(model_dir, "data=2,model=2", PlanOptions(preset="w4a4kv4-dynamic", prefix_len=1, batch_size=2, seqlen=16))
    res["plan"] = p["stages"]
    write_results(out, res, {})


@pytest.fixture(scope="module")
def measured(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plan") / "res")
    return run_worker("tests.test_plan", (tiny_dir,), out, timeout=600)[0]


@pytest.mark.parametrize("stage,key", [("load", "weights"), ("eval", "weights"), ("eval", "kv_cache"),
                                       ("runtime", "weights"), ("runtime", "kv_cache")])
def test_plan_bytes_equal_the_arrays_on_a_2x2_mesh(measured, stage, key):
    got = measured[stage + ("_kv" if key == "kv_cache" else "")]
    assert len(got) == 4 and len(set(got)) == 1, got  # every device holds the same share
    assert measured["plan"][stage][key] == got[0]


def test_llama_3_70b_on_8_devices_by_hand():
    """The FP load of Llama-3-70B over model=8: embeddings, head and norms whole, every layer's linears / 8."""
    from prefixquant_jax.plan import PlanOptions, plan

    p = plan("llama-3-70b", "data=1,model=8", PlanOptions(preset="w4a4kv4-dynamic"))
    c = p["config"]
    D, F, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_layers"]
    q, kv = c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]
    linears = 2 * D * q + 2 * D * kv + 3 * D * F
    assert p["params"] == 2 * V * D + D + L * (linears + 2 * D)
    assert p["stages"]["load"]["weights"] == 4 * (2 * V * D + D + L * (linears // 8 + 2 * D))
    assert p["stages"]["load"]["total"] < 80 * 2**30 < p["host_load_float32_bytes"]
    # int4 codes (half a byte per weight) + bf16 embeddings: about 1/8 of the float32 model per device
    assert p["stages"]["runtime"]["weights"] < p["stages"]["load"]["weights"] / 4
    assert math.isclose(p["stages"]["training"]["optimizer"], p["stages"]["training"]["weights"] * 2 / 3, rel_tol=0.01)


def test_plan_cli_json_and_config_sources(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    r = run_cli("plan", "--model", "llama-3-8b", "--mesh", "data=2,model=4", "--device-gib", "80", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["stages"]) == {"load", "calibration", "training", "eval", "runtime"}
    assert res["mesh"] == {"data": 2, "model": 4} and "fits" in r.stdout
    from prefixquant_jax.plan import resolve_config

    assert resolve_config(tiny_dir)[0].hidden_size == 64  # its config.json; no weight is read
    from tests.conftest import smollm2_path

    path = smollm2_path()
    if path:
        config, source = resolve_config(path)  # GGUF metadata only
        assert config.num_layers == 30 and source.endswith(".gguf")


@pytest.mark.parametrize("args,msg", [
    (["--model", "nope-70b"], "unknown model"),
    (["--model", "llama-3-8b", "--mesh", "model=3"], "does not divide the attention heads (32)"),
    (["--model", "qwen2.5-32b", "--mesh", "data=1,model=16"], "attention heads (40)"),
    (["--model", "llama-3-8b", "--mesh", "data=x"], "not an integer"),
    (["--model", "llama-3-8b", "--preset", "w3a3"], "unknown preset"),
    (["--model", "llama-3-8b", "--seqlen", "0"], "--seqlen must be >= 1"),
])
def test_plan_errors_are_one_line(args, msg):
    assert_one_line_error(run_cli("plan", *args), msg)
