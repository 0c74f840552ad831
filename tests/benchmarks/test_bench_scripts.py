"""The GPU benchmark scripts run (tiny shapes, interpret mode) and their GPU graphs lower for CUDA.

No GPU is needed: each script's --allow-cpu mode runs every case once at tiny shapes, which catches a
script that has drifted from the API it times (bench_layer once had); the Llama-3-8B layer that
bench_layer times on a GPU (the packed Decoder's jitted forward, eval.forward.logits) is lowered for CUDA with
its kernels compiled, at the real shapes, to check that every Pallas call in it goes through Triton
(tests/pallas_kernels/test_gpu_lowering.py).
"""
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks import bench_kernels, bench_layer, diagnose_calibration
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
    assert [(r["tokens"], r["cached"], r["prefix"]) for r in rows] == [(32, 0, 4), (1, 32, 4)]
    assert all(r["real_ms"] > 0 and r["bf16_ms"] > 0 for r in rows)
    # the script's float32 numerics check: interpret-mode kernels equal the jnp references (to f32 order)
    assert all(r["update_rel_err_vs_xla"] <= 1e-5 and r["kv_codes_equal_vs_xla"] == 1.0 for r in rows), rows


@pytest.mark.parametrize("method", ["flatquant", "prefixquant"])
def test_bench_train_runs(method, tiny_dir, tmp_path):
    from benchmarks import bench_train  # here: the other scripts' tests do not depend on this one importing

    out = tmp_path / "t.json"  # --threads 0: this test process keeps its cores
    bench_train.main(["--model", tiny_dir, "--allow-tiny", "--method", method, "--samples", "4", "--batch", "2",
                      "--seqlen", "16", "--steps", "2", "--threads", "0", "--json", str(out)])
    with open(out) as f:
        res = json.load(f)
    assert res["ours"]["step_s"] > 0 and res["seqlen"] == 16 and res["method"] == method


@pytest.mark.parametrize("a_bits,dynamic", [(4, False), (8, True)], ids=["w4a4-static", "w4a8-dynamic"])
def test_llama3_8b_layer_lowers_to_triton(a_bits, dynamic):
    from prefixquant_jax.eval import forward

    config, L, T = bench_layer.LLAMA3_8B_LAYER, 2048, 2048
    recipe = bench_layer.build_recipe(a_bits, dynamic)
    # shapes only: no 8B-layer weights made; interpret=False: the GPU path of every kernel
    real = nnx.eval_shape(lambda: bench_layer.packed(bench_layer.build(config, recipe)[1], interpret=False))
    assert real.prefix_len == bench_layer.PREFIX_LEN
    graphdef, state = nnx.split(real)
    fn = lambda state, tokens, cache: forward.logits(graphdef, state, tokens, cache)  # noqa: E731  what bench times
    gemm = "w4a4_matmul" if a_bits == 4 else "w4a8_matmul"
    for case, expected in (("prefill", {"rotate_quant", gemm}), ("decode", {"rotate_quant", gemm, "decode_attention"})):
        n_new, cached = bench_layer.case_shapes(case, L, T)
        cache = jax.eval_shape(lambda: bench_layer.filled_cache(real, n_new, cached, jax.random.PRNGKey(0)))
        tokens = jax.ShapeDtypeStruct((1, n_new), jnp.int32)
        assert set(cuda_kernels(fn, state, tokens, cache)) == expected, case


def diagnose(tiny_dir, text_file, tmp_path, variants):
    out = tmp_path / "d.json"
    diagnose_calibration.main(["--model", tiny_dir, "--calib-data", text_file, "--calib-samples", "4", "--calib-seqlen",
                               "32", "--variants", variants, "--json", str(out)])
    return json.loads(out.read_text())["results"]


def test_diagnose_calibration_runs(tiny_dir, text_file, tmp_path):
    """The [G] diagnostic on the tiny model, the reference's rules with GPTQ: per-layer errors, and what each weight
    rule claims holds (the output-aware clip never loses to the data-free one on the calibration inputs)."""
    res = diagnose(tiny_dir, text_file, tmp_path, "ref+gptq")
    assert set(res) == {"ref+gptq"} and len(res["ref+gptq"]["out_mse"]) == 2
    w = res["ref+gptq"]["weight_err"]
    assert set(w) == {"mse", "output", "gptq"}
    assert all(o <= m * (1 + 1e-6) for o, m in zip(w["output"], w["mse"]))


@pytest.mark.slow  # a second pipeline run (~15 s); test_diagnose_calibration_runs runs the script and checks the
def test_diagnose_calibration_two_variants(tiny_dir, text_file, tmp_path):  # ref+gptq claims in the default run
    """Every variant's per-layer errors side by side: the old rules (data-free weight clip) report no weight errors."""
    res = diagnose(tiny_dir, text_file, tmp_path, "old,ref+gptq")
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
