"""Eval and the real runtime on a (data x model) mesh give the single-device numbers
(prefixquant_jax/parallel/sharding.py: shard(model, MeshSpec) -> Placed(model, mesh)).

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
from prefixquant_jax.parallel.sharding import MeshSpec, partition_spec
from tests.parallel.four_devices import run_worker, write_results
from tests.cli.util import assert_one_line_error, main_cli

TOL = 1e-5


def windows(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, size=(2, 16)).astype(np.int32)


def evaluate(model, mesh, win, decode=True):
    """(mean NLL, logits of the batch, greedy tokens or None) of any Decoder whose state is on `mesh` (or None)."""
    import jax.numpy as jnp
    from flax import nnx

    from prefixquant_jax.eval import forward
    from prefixquant_jax.eval.generate import greedy
    from prefixquant_jax.eval.perplexity import perplexity
    from prefixquant_jax.parallel.sharding import place_batch

    B, L = win.shape
    ppl = perplexity(model, win, batch_size=B, progress=False, mesh=mesh)
    graphdef, state = nnx.split(model)
    logits, _ = forward.logits(graphdef, state, place_batch(mesh, jnp.asarray(win)),
                               place_batch(mesh, model.init_cache(B, L)))
    return ppl["nll"], np.asarray(logits), greedy(model, [5, 6, 7], 4, mesh=mesh) if decode else None


def worker(model_dir: str, out: str) -> None:
    """In the 4-device subprocess: FP, fake-quant and real runtime on one device and on meshes; results to `out`."""
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec

    import prefixquant_jax as pq
    from prefixquant_jax.eval.models import load_for_eval
    from prefixquant_jax.parallel.sharding import shard

    assert len(jax.devices()) == 4
    ck = pq.load_checkpoint(model_dir)
    win = windows(ck.config.vocab_size)
    calib = np.random.default_rng(1).integers(3, ck.config.vocab_size, size=(2, 16))
    qm = pq.quantize(ck, calib, "w4a4kv4-dynamic", prefix_ids=(1,), weight_clip="mse")
    cases = {"fp": pq.Decoder(ck.config, ck.params), "fake": qm.model, "real": pq.pack(qm, backend="xla")}
    res, arrays = {}, {}
    for name, model in cases.items():
        meshes = ["data=1,model=1", "data=2,model=2"] + (["data=2,model=1"] if name == "fp" else [])
        for m in meshes:
            spec, base = MeshSpec.parse(m), model
            if name == "fp" and m != "data=1,model=1":  # eval --mesh: the weights put on the mesh from the host
                ev = load_for_eval(model_dir, mesh=spec)
                assert ev.mesh is not None and ev.name == "fp"
                base = ev.model
                placed = [a.sharding for a in jax.tree.leaves(nnx.state(base))]
            p = shard(base, spec)
            assert (m == "data=1,model=1") == (p.model is base and p.mesh is None)
            if base is not model:  # already where shard() wants it: never whole on one device
                assert placed == [a.sharding for a in jax.tree.leaves(nnx.state(p.model))]
            if m.endswith("model=2"):  # the weights are really split
                leaves = jax.tree.leaves(nnx.state(p.model))
                specs = {a.sharding.spec for a in leaves}
                assert {PartitionSpec(None, "model"), PartitionSpec("model", None)} <= specs, specs
                for a in leaves:  # a split weight: each device holds half of it
                    want = [n // 2 if ax == "model" else n for n, ax in zip(a.shape, tuple(a.sharding.spec) + (None,) * a.ndim)]
                    assert [list(sh.data.shape) for sh in a.addressable_shards] == [want] * 4, (a.shape, a.sharding)
            nll, logits, toks = evaluate(p.model, p.mesh, win, decode=name != "fake")  # fewer compilations
            res[f"{name}/{m}"] = {"nll": nll, "greedy": toks}
            arrays[f"{name}/{m}"] = logits
    write_results(out, res, arrays)


@pytest.fixture(scope="module")
def mesh_run(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mesh") / "res")
    return run_worker("tests.parallel.test_sharding", (tiny_dir,), out, timeout=600)


def test_fp_one_device_in_subprocess_equals_this_process(mesh_run, tiny_dir):
    """The 4-device process's one-device reference is this (one-device) process's computation, bit for bit."""
    import prefixquant_jax as pq

    ck = pq.load_checkpoint(tiny_dir)
    nll, logits, toks = evaluate(pq.Decoder(ck.config, ck.params), None, windows(ck.config.vocab_size))
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
    with pytest.raises(UserError, match="mesh axis model must be a positive integer") as e:
        MeshSpec(model=0)
    assert e.value.fields == ("MeshSpec.model",)
    from jax.sharding import PartitionSpec as P

    assert partition_spec(("layers", 0, "attn", "q", "kernel"), 2) == P(None, "model")
    assert partition_spec(("layers", 0, "attn", "q", "bias"), 1) == P("model")
    assert partition_spec(("layers", 0, "mlp", "down", "kernel"), 2) == P("model", None)
    assert partition_spec(("layers", 1, "attn", "o", "kernel"), 2) == P("model", None)  # packed codes: same path
    assert partition_spec(("layers", 0, "qparams", "q", "scale"), 2) == P()
    assert partition_spec(("layers", 0, "prefix_k"), 3) == P()
    assert partition_spec(("embed",), 2) == P()


def test_shard_without_a_mesh_is_the_model(tiny_quantized):
    from prefixquant_jax.parallel.sharding import place_batch, shard

    qm = tiny_quantized("w4a4kv4-static")
    for spec in (None, MeshSpec(1, 1)):
        placed = shard(qm.model, spec)
        assert placed.model is qm.model and placed.mesh is None
    tree = {"x": np.zeros((2, 3))}
    assert place_batch(None, tree) is tree


def test_cli_mesh_errors(tiny_dir, text_file, capsys):
    for mesh, msg in (("data=2,model=2", "needs 4 devices"), ("data=two", "not an integer")):
        r = main_cli(capsys, "eval", "--model", tiny_dir, "--data", text_file, "--seqlen", "16", "--max-windows",
                     "1", "--mesh", mesh)
        assert_one_line_error(r, msg)
