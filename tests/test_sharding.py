"""Eval and the real runtime on a (data x model) mesh give the single-device numbers (prefixquant_jax/sharding.py).

The mesh runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (JAX reads it once, at
start). Measured on the tiny model (2 windows x 16 tokens, one batch of 2):
  data=2,model=1 (FP)                   bit-identical logits and NLL: rows are independent.
  data=2,model=2, FP                    logits differ by ~2e-7 (a few float32 ulps): o and down are row-split over
                                        `model`, so each output is a sum of per-device partial sums, another float
                                        summation order. Asserted: |a - b| <= 1e-5 (1 + max|b|), the runtime tests'
                                        tolerance, and the NLL within 1e-5 relative.
  data=2,model=2, fake w4a4kv4-dynamic  same bound; the 4-bit codes are those of the single-device run (a code
  and real int4 runtime (xla)           would flip only at a rounding tie, none with these seeds); greedy
                                        tokens equal (FP and real; decoding is not rerun for fake, to compile less).
Measured: max |logits diff| 1.8e-7 (FP, fake) and 8.9e-8 (real) of max |logits| ~0.69; mean NLL equal to the bit.
"""

import numpy as np
import pytest

from prefixquant_jax.errors import UserError
from prefixquant_jax.sharding import MeshSpec, weight_spec
from tests.four_devices import run_worker, write_results

TOL = 1e-5


def evaluate(compiled, prefix_kv, windows, decode=True):
    """(mean NLL, logits of the batch, greedy tokens or None) through the duck-typed Compiled interface."""
    import jax.numpy as jnp

    from prefixquant_jax.eval.generate import greedy
    from prefixquant_jax.eval.perplexity import perplexity

    P = 0 if prefix_kv is None else prefix_kv.length
    B, L = windows.shape
    ppl = perplexity(compiled, windows, prefix_kv, batch_size=B, progress=False)
    logits, _ = compiled.logits(compiled.state, jnp.asarray(windows), compiled.cache(B, P + L, prefix_kv), P)
    return ppl["nll"], np.asarray(logits), greedy(compiled, [5, 6, 7], 4, prefix_kv=prefix_kv) if decode else None


def worker(model_dir: str, text: str, out: str) -> None:
    """In the 4-device subprocess: FP, fake-quant and real runtime on one device and on meshes; results to `out`."""
    import jax
    from jax.sharding import PartitionSpec

    from checkpoints_convert import load_checkpoint
    from prefixquant_jax.compiled import Compiled
    from prefixquant_jax.loading import load_fp
    from prefixquant_jax.model import Llama
    from prefixquant_jax.pipeline import QuantizeOptions, quantize
    from prefixquant_jax.quant.presets import get_preset
    from prefixquant_jax.runtime import RealCompiled, pack
    from prefixquant_jax.sharding import ShardedCompiled, shard

    assert len(jax.devices()) == 4
    ck = load_checkpoint(model_dir)
    win = np.random.default_rng(0).integers(3, ck.config.vocab_size, size=(2, 16)).astype(np.int32)
    opts = QuantizeOptions(calib_data=text, calib_samples=2, calib_seqlen=16, prefix_ids=(1,), progress=False,
                           calibrate=False)
    qm = quantize(ck, ck.tokenizer(), get_preset("w4a4kv4-dynamic"), opts)
    cases = {"fp": (Compiled(Llama.from_params(ck.config, ck.params)), None),
             "fake": (Compiled(qm.model), qm.prefix_kv), "real": (RealCompiled(pack(qm, backend="xla")), qm.prefix_kv)}
    res, arrays = {}, {}
    for name, (compiled, pkv) in cases.items():
        meshes = ["data=1,model=1", "data=2,model=2"] + (["data=2,model=1"] if name == "fp" else [])
        for m in meshes:
            base = compiled
            if name == "fp" and m != "data=1,model=1":  # the CLI's path: weights put on the mesh from the host
                base = Compiled(load_fp(model_dir, mesh=MeshSpec.parse(m))[1])
                placed = [a.sharding for a in jax.tree.leaves(base.state)]
            c = shard(base, MeshSpec.parse(m))
            assert (m == "data=1,model=1") == (c is base)
            if base is not compiled:  # already where shard() wants it: never whole on one device
                assert placed == [a.sharding for a in jax.tree.leaves(c.state)]
            if isinstance(c, ShardedCompiled) and m.endswith("model=2"):  # the weights are really split
                specs = {a.sharding.spec for a in jax.tree.leaves(c.state)}
                assert {PartitionSpec(None, "model"), PartitionSpec("model", None)} <= specs, specs
                for a in jax.tree.leaves(c.state):  # a split weight: each device holds half of it
                    want = [n // 2 if ax == "model" else n for n, ax in zip(a.shape, tuple(a.sharding.spec) + (None,) * a.ndim)]
                    assert [list(sh.data.shape) for sh in a.addressable_shards] == [want] * 4, (a.shape, a.sharding)
            nll, logits, toks = evaluate(c, pkv, win, decode=name != "fake")  # fewer compilations
            res[f"{name}/{m}"] = {"nll": nll, "greedy": toks}
            arrays[f"{name}/{m}"] = logits
    write_results(out, res, arrays)


@pytest.fixture(scope="module")
def mesh_run(tiny_dir, text_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mesh") / "res")
    return run_worker("tests.test_sharding", (tiny_dir, text_file), out, timeout=600)


def test_fp_one_device_in_subprocess_equals_this_process(mesh_run, tiny_dir):
    """The 4-device process's one-device reference is this (one-device) process's computation, bit for bit."""
    from checkpoints_convert import load_checkpoint
    from prefixquant_jax.compiled import Compiled
    from prefixquant_jax.model import Llama

    ck = load_checkpoint(tiny_dir)
    win = np.random.default_rng(0).integers(3, ck.config.vocab_size, size=(2, 16)).astype(np.int32)
    nll, logits, toks = evaluate(Compiled(Llama.from_params(ck.config, ck.params)), None, win)
    res, arrays = mesh_run
    assert nll == res["fp/data=1,model=1"]["nll"]
    np.testing.assert_array_equal(logits, arrays["fp/data=1,model=1"])
    assert toks == res["fp/data=1,model=1"]["greedy"]


def test_data_only_mesh_is_bit_identical(mesh_run):
    res, arrays = mesh_run
    assert res["fp/data=2,model=1"] == res["fp/data=1,model=1"]
    np.testing.assert_array_equal(arrays["fp/data=2,model=1"], arrays["fp/data=1,model=1"])


@pytest.mark.parametrize("name", ["fp", "fake", "real"])
def test_2x2_mesh_matches_one_device(mesh_run, name):
    res, arrays = mesh_run
    one, two = f"{name}/data=1,model=1", f"{name}/data=2,model=2"
    a, b = arrays[two], arrays[one]
    err = np.abs(a - b).max()
    assert err <= TOL * (1 + np.abs(b).max()), (err, np.abs(b).max())
    assert abs(res[two]["nll"] - res[one]["nll"]) <= TOL * abs(res[one]["nll"])
    assert res[two]["greedy"] == res[one]["greedy"]


def test_mesh_spec_parse_and_errors():
    assert MeshSpec.parse(None) == MeshSpec() and MeshSpec.parse("data=2,model=2") == MeshSpec(2, 2)
    assert MeshSpec.parse("model=2").resolve(8) == (4, 2) and MeshSpec().resolve(3) == (3, 1)
    for bad in ("data=2,model", "pipe=2", "data=x", "data=0", "data=1,data=2"):
        with pytest.raises(UserError):
            MeshSpec.parse(bad)
    with pytest.raises(UserError, match="needs 4 devices, 1 local"):
        MeshSpec(2, 2).resolve(1)
    from jax.sharding import PartitionSpec as P

    assert weight_spec(("layers", 0, "attn", "q", "kernel"), 2) == P(None, "model")
    assert weight_spec(("layers", 0, "mlp", "down", "kernel"), 2) == P("model", None)
    assert weight_spec(("layers", 1, "qkv", "qvalue"), 2) == P(None, "model")
    assert weight_spec(("layers", 0, "qparams", "q", "scale"), 2) == P()
    assert weight_spec(("embed",), 2) == P()


def test_cli_mesh_errors(tiny_dir, text_file, capsys):
    from prefixquant_jax.cli import main

    for mesh, msg in (("data=2,model=2", "needs 4 devices"), ("data=two", "not an integer")):
        rc = main(["eval", "--model", tiny_dir, "--data", text_file, "--seqlen", "16", "--max-windows", "1",
                   "--mesh", mesh])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(err) == 1 and msg in err[0], err
