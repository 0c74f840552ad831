"""The GPU benchmark scripts run (tiny shapes, interpret mode) and their GPU graphs lower for CUDA.

No GPU is needed: each script's --allow-cpu mode runs every case once at tiny shapes, which catches a
script that has drifted from the API it times (bench_layer once had); the Llama-3-8B layer that
bench_layer times on a GPU is lowered for CUDA with its kernels compiled, at the real shapes, to check
that every Pallas call in it goes through Triton (tests/pallas_kernels/test_gpu_lowering.py).
"""
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import bench_kernels, bench_layer, bench_train, diagnose_calibration
from tests.pallas_kernels.test_gpu_lowering import cuda_kernels


def read_rows(path):
    with open(path) as f:
        return json.load(f)["results"]


def test_bench_kernels_allow_cpu(tmp_path):
    out = tmp_path / "k.json"
    assert bench_kernels.main(["--allow-cpu", "--json", str(out)]) == 0
    rows = read_rows(out)
    assert {r["case"] for r in rows} == {"w4a4_gemm", "w4a8_gemm", "w4_gemv", "rotate_quant", "decode_attention"}
    assert all(r["kernel_ms"] > 0 for r in rows)


@pytest.mark.parametrize("extra", [[], ["--a-bits", "8", "--dynamic"]], ids=["w4a4-static", "w4a8-dynamic"])
def test_bench_layer_allow_cpu(tmp_path, extra):
    out = tmp_path / "l.json"
    assert bench_layer.main(["--allow-cpu", "--json", str(out)] + extra) == 0
    rows = read_rows(out)
    assert [r["case"] for r in rows] == ["prefill", "decode"]
    assert all(r["real_ms"] > 0 and r["bf16_ms"] > 0 for r in rows)
    # the script's float32 numerics check: interpret-mode kernels equal the jnp references (to f32 order)
    assert all(r["update_rel_err_vs_xla"] <= 1e-5 and r["kv_codes_equal_vs_xla"] == 1.0 for r in rows), rows


def test_bench_train_runs(tmp_path):
    out = tmp_path / "t.json"
    bench_train.main(["--batch", "1", "--seqlen", "32", "--steps", "1", "--json", str(out)])
    with open(out) as f:
        res = json.load(f)
    assert res["steps_per_s"] > 0 and res["seqlen"] == 32


@pytest.mark.parametrize("a_bits,dynamic", [(4, False), (8, True)], ids=["w4a4-static", "w4a8-dynamic"])
def test_llama3_8b_layer_lowers_to_triton(a_bits, dynamic):
    config, P, L, T = bench_layer.LLAMA3_8B_LAYER, 4, 2048, 2048
    spec = bench_layer.build_spec(config, P, a_bits, dynamic, "kernels", interpret=False)
    lp = jax.eval_shape(lambda: bench_layer.build(config, spec)[1])  # shapes only: no 8B-layer weights made
    real = bench_layer.real_layer(config, spec)
    KV, hd = config.num_kv_heads, config.head_dim
    prefix = jax.ShapeDtypeStruct((P, KV, hd), jnp.float32)
    gemm = "w4a4_matmul" if a_bits == 4 else "w4a8_matmul"
    for case, expected in (("prefill", {"rotate_quant", gemm}), ("decode", {"rotate_quant", gemm, "decode_attention"})):
        n_new, cached, rows = bench_layer.case_shapes(config, case, L, T)
        cache = jax.ShapeDtypeStruct((1, rows, KV, hd // 2), jnp.int8)
        x = jax.ShapeDtypeStruct((1, n_new, config.hidden_size), jnp.bfloat16)
        assert set(cuda_kernels(real, lp, x, cache, cache, prefix, prefix, cached)) == expected, case


def test_diagnose_calibration_runs(tiny_dir, text_file, tmp_path):
    """The [G] diagnostic on the tiny model: every variant's per-layer errors, and what each rule claims holds."""
    out = tmp_path / "d.json"
    diagnose_calibration.main(["--model", tiny_dir, "--calib-data", text_file, "--calib-samples", "4", "--calib-seqlen",
                               "32", "--variants", "old,ref+gptq", "--json", str(out)])
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"old", "ref+gptq"}
    assert all(len(r["out_mse"]) == 2 for r in res.values())
    w = res["ref+gptq"]["weight_err"]
    assert all(o <= m * (1 + 1e-6) for o, m in zip(w["output"], w["mse"]))
    assert set(res["ref+gptq"]["weight_err"]) == {"mse", "output", "gptq"} and not res["old"]["weight_err"]


def test_diagnose_variant_steps_parse():
    """Variant names map to the preset/option changes they say (dampNNN is a thousandth of the mean diagonal)."""
    pkw, okw = diagnose_calibration.variant("grid+aclip80+aclip70@down_in+gptq+damp100")
    assert pkw["full_grid"] and pkw["act_clip"] == 0.8 and pkw["act_site_clips"] == (("down_in", 0.7),)
    assert okw["gptq"] and okw["gptq_damp"] == 0.1
    with pytest.raises(SystemExit, match="unknown variant step"):
        diagnose_calibration.variant("grid+dampx")
