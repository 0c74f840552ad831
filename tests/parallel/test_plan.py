"""`prefixquant plan` (prefixquant_jax/parallel/plan.py): per-device bytes from jax.eval_shape, checked against the
arrays a real 2 x 2 mesh holds (a 4-host-device subprocess): the FP model eval --mesh loads, the fake-quant model and its
KV cache, the packed int4 runtime model and its integer cache, byte for byte on every device."""
import json
import math

import pytest

from tests.parallel.four_devices import run_worker, write_results
from tests.cli.util import assert_one_line_error, main_cli


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
    from flax import nnx

    import prefixquant_jax as pq
    from prefixquant_jax.eval.models import load_for_eval
    from prefixquant_jax.parallel.plan import PlanOptions, plan
    from prefixquant_jax.parallel.sharding import MeshSpec, place_batch, shard

    assert len(jax.devices()) == 4
    spec = MeshSpec.parse("data=2,model=2")
    res = {}
    fp = load_for_eval(model_dir, mesh=spec)  # eval --mesh: weights from the host onto the mesh
    res["load"] = _device_bytes(nnx.state(fp.model))
    ck = pq.load_checkpoint(model_dir)
    qm = pq.quantize(ck, np.full((1, 16), 5, np.int32), "w4a4kv4-dynamic", prefix_ids=(1,), weight_clip="mse")
    fake = shard(qm.model, spec)
    res["eval"] = _device_bytes(nnx.state(fake.model))
    res["eval_kv"] = _device_bytes(place_batch(fake.mesh, fake.model.init_cache(2, 16)))
    real = shard(pq.pack(qm, backend="xla", dtype=jax.numpy.bfloat16), spec)
    res["runtime"] = _device_bytes(nnx.state(real.model))
    res["runtime_kv"] = _device_bytes(place_batch(real.mesh, real.model.init_cache(2, 16)))
    p = plan(model_dir, "data=2,model=2", PlanOptions(preset="w4a4kv4-dynamic", prefix_len=1, batch_size=2, seqlen=16))
    res["plan"] = p["stages"]
    write_results(out, res, {})


@pytest.fixture(scope="module")
def measured(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plan") / "res")
    return run_worker("tests.parallel.test_plan", (tiny_dir,), out, timeout=600)[0]


@pytest.mark.parametrize("stage,key", [("load", "weights"), ("eval", "weights"), ("eval", "kv_cache"),
                                       ("runtime", "weights"), ("runtime", "kv_cache")])
def test_plan_bytes_equal_the_arrays_on_a_2x2_mesh(measured, stage, key):
    got = measured[stage + ("_kv" if key == "kv_cache" else "")]
    assert len(got) == 4 and len(set(got)) == 1, got  # every device holds the same share
    assert measured["plan"][stage][key] == got[0]


def test_llama_3_70b_on_8_devices_by_hand():
    """The FP load of Llama-3-70B over model=8: embeddings, head and norms whole, every layer's linears / 8."""
    from prefixquant_jax.parallel.plan import PlanOptions, plan

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


def test_plan_cli_json_and_config_sources(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    r = main_cli(capsys, "plan", "--model", "llama-3-8b", "--mesh", "data=2,model=4", "--device-gib", "80",
                 "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["stages"]) == {"load", "calibration", "training", "eval", "runtime"}
    assert res["mesh"] == {"data": 2, "model": 4} and "fits" in r.stdout
    from prefixquant_jax.parallel.plan import resolve_config

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
    (["--model", "llama-3-8b", "--seqlen", "0"], "--seqlen: must be an integer >= 2"),
])
def test_plan_errors_are_one_line(args, msg, capsys):
    assert_one_line_error(main_cli(capsys, "plan", *args), msg)
