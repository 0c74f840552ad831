"""Saved quantized checkpoints (prefixquant_jax.checkpoint.saved): exact round trip, CLI --save / --model DIR,
export-prefix / --import-prefix, atomic writes and one-line errors for damaged checkpoints."""
import dataclasses
import json
import os
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest

import prefixquant_jax as pq
from checkpoints_convert import load_checkpoint
from prefixquant_jax.checkpoint import saved as orbax_io
from prefixquant_jax.errors import UserError
from tests.conftest import rng_tokens
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def quantized(tiny_dir, text_file):
    from prefixquant_jax.quant.presets import get_preset
    from prefixquant_jax.pipeline import QuantizeOptions, quantize

    ck = load_checkpoint(tiny_dir)
    tok = ck.tokenizer()
    opts = QuantizeOptions(calib_data=text_file, calib_samples=4, calib_seqlen=32, prefix_ids=(1,), progress=False)
    return quantize(ck, tok, get_preset("w4a4kv4-static"), opts), tok


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    qm, tok = quantized
    return pq.save(qm, str(tmp_path_factory.mktemp("saved") / "q"), tokenizer=tok)


def jit_logits_and_ppl(compiled, qm, tok=None, text_file=None, n=12):
    """Logits of one window (and ppl over 2 windows when tok is given) through `compiled`, a Compiled
    of an equal graphdef, run with qm's state and prefix KV: the same jitted program for both models."""
    from flax import nnx

    from prefixquant_jax.eval.data import load_text, tokenize, windows
    from prefixquant_jax.eval.perplexity import perplexity

    graphdef, compiled.state = nnx.split(qm.model)
    assert graphdef == compiled.graphdef  # structure, recipe and config are equal too
    P = qm.prefix_kv.length
    win = jnp.asarray(rng_tokens(n, qm.config.vocab_size)[None])
    out, _ = compiled.logits(compiled.state, win, compiled.cache(1, P + n, qm.prefix_kv), P)
    if tok is None:
        return np.asarray(out), None
    ws = windows(tokenize(tok, load_text(text_file)), 32, 2)
    return np.asarray(out), perplexity(compiled, ws, qm.prefix_kv, progress=False)["ppl"]


def main_cli(capsys, *args):
    """Run the CLI in this process (no interpreter start-up); same result shape as run_cli."""
    from prefixquant_jax.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def test_round_trip_identical_logits_and_ppl(quantized, saved, text_file):
    qm, tok = quantized
    back = pq.load(saved)
    assert back.fp_model is None and back.preset == qm.preset and back.config == qm.config
    assert back.model.layers[0].recipe == qm.model.layers[0].recipe
    assert back.prefix_kv.prefix_ids == [1] and back.prefix_kv.k_rotated
    for a, b in zip(qm.model.layers, back.model.layers):
        assert sorted(a.qparams.keys()) == sorted(b.qparams.keys())
    from prefixquant_jax.compiled import Compiled

    compiled = Compiled(qm.model)
    la, pa = jit_logits_and_ppl(compiled, qm, tok, text_file)
    lb, pb = jit_logits_and_ppl(compiled, back, orbax_io.saved_tokenizer(saved), text_file)
    np.testing.assert_array_equal(la, lb)
    assert pa == pb

    meta = json.loads(open(os.path.join(saved, orbax_io.META)).read())
    assert meta["format"] == "prefixquant-quantized/1" and meta["method"] == "prefixquant"
    assert meta["bits"] == {"w": 4, "a": 4, "kv": 4} and meta["rotation"]["rotated"] and meta["rotation"]["seed"] == 0
    assert meta["quantizers"]["k_cache"]["granularity"] == "head" and meta["prefix"]["prefix_ids"] == meta["prefix"]["token_ids"] == [1]
    assert set(meta["qparams"]["0"]) == set(qm.model.layers[0].qparams.keys())
    kinds = {tuple(e["path"]): e["stored"] for e in meta["variables"]}
    if "q" in qm.model.layers[0].qparams:  # weights with a scale are stored as packed int4 codes
        assert kinds[("layers", 0, "attn", "q", "kernel")] == "int4" and kinds[("embed",)] == "raw"
        import orbax.checkpoint as ocp
        raw = ocp.PyTreeCheckpointer().restore(os.path.join(saved, orbax_io.STATE))
        assert raw["layers"]["0"]["attn"]["q"]["kernel"].dtype == np.int8
        assert raw["layers"]["0"]["attn"]["q"]["kernel"].shape == (qm.config.hidden_size // 2, qm.config.num_heads * qm.config.head_dim)
        assert meta["sizes"]["disk_bytes"] < 0.7 * meta["sizes"]["fp32_params_bytes"]


def test_packed_runtime_takes_the_stored_codes(quantized, saved):
    """A loaded model's int4 codes reach the runtime as stored (no float round trip); a kernel changed after
    loading is re-encoded from the model instead; either way the codes equal a fresh pack of the original."""
    import orbax.checkpoint as ocp

    from prefixquant_jax.runtime import pack

    qm, _ = quantized
    back = pq.load(saved)
    raw = ocp.PyTreeCheckpointer().restore(os.path.join(saved, orbax_io.STATE))
    o = back.weights[(0, "o")]
    assert o.bits == 4 and o.packed_axis == 0
    np.testing.assert_array_equal(np.asarray(o.qvalue), raw["layers"]["0"]["attn"]["o"]["kernel"])
    fresh, loaded = pack(qm, backend="xla"), pack(back, backend="xla")
    assert loaded.layers[0].o.qvalue is o.qvalue  # the stored array itself
    for a, b in zip(fresh.layers, loaded.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            np.testing.assert_array_equal(np.asarray(getattr(a, name).qvalue), np.asarray(getattr(b, name).qvalue))
    k = back.model.layers[0].attn.o.kernel
    k[...] = k[...] * 2.0  # the model no longer holds the stored codes
    assert pack(back, backend="xla").layers[0].o.qvalue is not o.qvalue


def test_int8_weights_and_extra_variables(quantized, tmp_path):
    """w_bits 8 stores int8 codes; a variable of another type in a new container survives the round trip."""
    from flax import nnx

    from prefixquant_jax.model import with_recipe
    from prefixquant_jax.quant.spec import QuantSpec

    qm, tok = quantized
    spec8 = QuantSpec(bits=8, granularity="channel", symmetric=True)
    model = with_recipe(nnx.clone(qm.model), dataclasses.replace(qm.model.layers[0].recipe, weight=spec8))
    for b in model.layers:
        for n, mod in [(n, getattr(b.attn, n)) for n in "qkvo"] + [(n, getattr(b.mlp, n)) for n in ("gate", "up", "down")]:
            w = np.asarray(mod.kernel[...])
            b.set_quantizer(n, jnp.asarray(np.abs(w).max(axis=0, keepdims=True) * 0.9 / 127))
    model.layers[1].extra = nnx.Dict()
    model.layers[1].extra["t"] = nnx.BatchStat(jnp.arange(6.0).reshape(2, 3))
    q8 = dataclasses.replace(qm, model=model, preset=dataclasses.replace(qm.preset, w_bits=8))
    back = pq.load(pq.save(q8, str(tmp_path / "q8")))
    meta = orbax_io.read_metadata(str(tmp_path / "q8"))
    kinds = {tuple(e["path"]): e["stored"] for e in meta["variables"]}
    assert kinds[("layers", 1, "mlp", "down", "kernel")] == "int8" and meta["tokenizer"] is None
    assert isinstance(back.model.layers[1].extra["t"], nnx.BatchStat)
    np.testing.assert_array_equal(np.asarray(back.model.layers[1].extra["t"][...]), np.arange(6.0).reshape(2, 3))
    from prefixquant_jax.compiled import Compiled

    compiled = Compiled(q8.model)
    np.testing.assert_array_equal(jit_logits_and_ppl(compiled, q8)[0], jit_logits_and_ppl(compiled, back)[0])


def test_cli_save_eval_export_import(tiny_dir, tmp_path, text_file, capsys):
    src, A, B = tmp_path / "src", str(tmp_path / "A"), str(tmp_path / "B")
    shutil.copytree(tiny_dir, src)
    common = ["--preset", "w4a4kv4-static", "--model", str(src), "--calib-data", text_file, "--calib-samples", "4",
              "--calib-seqlen", "32", "--eval-data", text_file, "--seqlen", "32", "--max-windows", "2", "--no-fp"]
    r = run_cli("quantize", *common, "--prefix-ids", "1", "--save", A, "--json", str(tmp_path / "qa.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    qa = json.loads((tmp_path / "qa.json").read_text())
    assert qa["saved"] == A and os.path.isfile(os.path.join(A, "tokenizer", "tokenizer.json"))

    pfile = str(tmp_path / "p.safetensors")
    r = main_cli(capsys, "export-prefix", "--model", A, "--out", pfile)
    assert r.returncode == 0, r.stderr[-3000:]
    r = main_cli(capsys, "quantize", *common, "--import-prefix", pfile, "--no-eval", "--save", B)
    assert r.returncode == 0, r.stderr[-3000:]
    meta_a, meta_b = orbax_io.read_metadata(A), orbax_io.read_metadata(B)
    assert meta_b["report"]["outliers"]["source"] == "imported"
    assert meta_a["variables"] == meta_b["variables"]  # every stored array has the same CRC: the same model
    pa, pb = orbax_io.load_saved_prefix(A), orbax_io.load_saved_prefix(B)
    assert pa.prefix_ids == pb.prefix_ids == [1] and pa.text == pb.text and pa.k_rotated and pb.k_rotated
    for x, y in zip(pa.k + pa.v, pb.k + pb.v):
        np.testing.assert_array_equal(x, y)

    shutil.rmtree(src)  # from here on only the saved directories exist
    r = main_cli(capsys, "eval", "--model", A, "--data", text_file, "--seqlen", "32", "--max-windows", "2", "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["ppl"] == qa["ppl"] and ev["windows"] == qa["windows"] and ev["preset"] == "w4a4kv4-static"
    r = main_cli(capsys, "eval", "--model", B, "--import-prefix", pfile, "--data", text_file, "--seqlen", "32",
                 "--max-windows", "2", "--json", str(tmp_path / "e2.json"))
    assert r.returncode == 0 and json.loads((tmp_path / "e2.json").read_text())["ppl"] == qa["ppl"]
    r = main_cli(capsys, "generate", "--model", A, "--prompt", "The quick", "--max-new-tokens", "2", "--no-chat")
    assert r.returncode == 0, r.stderr[-3000:]


def _largest_state_file(d):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, orbax_io.STATE)) for f in fs]
    return max(files, key=os.path.getsize)


def _damage(d, kind):
    meta_path = os.path.join(d, orbax_io.META)
    if kind == "truncated":
        f = _largest_state_file(d)
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
    elif kind == "corrupted":
        f = _largest_state_file(d)
        data = bytearray(open(f, "rb").read())
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0x5A
        open(f, "wb").write(bytes(data))
    elif kind in ("version", "format"):
        meta = json.loads(open(meta_path).read())
        meta["format"] = "prefixquant-quantized/99" if kind == "version" else "something-else/1"
        open(meta_path, "w").write(json.dumps(meta))
    elif kind == "truncated-metadata":
        text = open(meta_path).read()
        open(meta_path, "w").write(text[: len(text) // 2])
    elif kind == "missing-prefix":
        os.remove(os.path.join(d, orbax_io.PREFIX))
    elif kind == "missing-metadata":
        os.remove(meta_path)
    elif kind == "missing-data":
        os.remove(_largest_state_file(d))


@pytest.mark.parametrize("kind, message", [
    ("truncated", "corrupted"), ("corrupted", "corrupted"), ("version", "format version '99' is not supported"),
    ("format", "not a prefixquant checkpoint"), ("truncated-metadata", "truncated metadata"),
    ("missing-prefix", "missing"), ("missing-metadata", "not a prefixquant checkpoint"),
    ("missing-data", "cannot read the Orbax checkpoint")])
def test_damaged_checkpoint_one_line_error(saved, tmp_path, capsys, kind, message):
    d = str(tmp_path / "bad")
    shutil.copytree(saved, d)
    _damage(d, kind)
    assert_one_line_error(main_cli(capsys, "eval", "--model", d, "--seqlen", "32", "--max-windows", "1"), message)


def test_missing_checkpoint_dir(tmp_path, capsys):
    assert_one_line_error(main_cli(capsys, "export-prefix", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "p")),
                          "does not exist")
    with pytest.raises(UserError, match="does not exist"):
        pq.load(str(tmp_path / "nope"))


def test_interrupted_save_leaves_nothing(quantized, saved, tmp_path, monkeypatch):
    qm, tok = quantized
    real = orbax_io._write_state

    def write_then_die(directory, tree):
        real(directory, tree)  # the state is on disk, the metadata is not: as if killed mid-way
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io, "_write_state", write_then_die)
    target = tmp_path / "new" / "q"
    with pytest.raises(KeyboardInterrupt):
        pq.save(qm, str(target), tokenizer=tok)
    assert not target.exists() and os.listdir(tmp_path / "new") == []
    old = tmp_path / "old"
    shutil.copytree(saved, old / "q")
    before = (old / "q" / orbax_io.META).read_bytes()
    with pytest.raises(KeyboardInterrupt):
        pq.save(qm, str(old / "q"), overwrite=True)
    assert (old / "q" / orbax_io.META).read_bytes() == before and os.listdir(old) == ["q"]
    assert pq.load(str(old / "q")).preset == qm.preset


def test_save_refuses_existing_dir(tiny_dir, quantized, saved, tmp_path, capsys):
    qm, _ = quantized
    d = tmp_path / "q"
    shutil.copytree(saved, d)
    before = (d / orbax_io.META).read_bytes()
    r = main_cli(capsys, "quantize", "--model", tiny_dir, "--preset", "w4a4kv4-static", "--save", str(d), "--no-eval")
    assert_one_line_error(r, "already exists")
    assert (d / orbax_io.META).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["q"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to replace"):
        pq.save(qm, str(other), overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    pq.save(qm, str(d), overwrite=True)  # a checkpoint is replaced with --overwrite
    assert pq.load(str(d)).prefix_kv.prefix_ids == [1]


def test_import_prefix_mismatch(tiny_dir, tmp_path, capsys):
    from dataclasses import replace

    from checkpoints_convert.prefix_io import save_prefix_kv
    from prefixquant_jax.model import Llama
    from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv

    ck = load_checkpoint(tiny_dir)
    plain = compute_prefix_kv(Llama.from_params(ck.config, ck.params), [1, 5])  # unrotated: k_rotated False
    f = save_prefix_kv(plain, str(tmp_path / "plain.safetensors"))
    args = ["quantize", "--model", tiny_dir, "--no-eval"]
    assert_one_line_error(main_cli(capsys, *args, "--preset", "w4a4kv4-static", "--import-prefix", f), "unrotated model")
    assert_one_line_error(main_cli(capsys, *args, "--preset", "quarot-w4a4kv4", "--import-prefix", f), "uses no prefix")
    narrow = replace(plain, k=[k[..., :8] for k in plain.k], v=[v[..., :8] for v in plain.v], k_rotated=True)
    g = save_prefix_kv(narrow, str(tmp_path / "narrow.safetensors"))
    assert_one_line_error(main_cli(capsys, *args, "--preset", "w4a4kv4-static", "--import-prefix", g), "does not fit")


def _to_flat_qparams_layout(src: str, dst: str) -> None:
    """Rewrite checkpoint `src` into `dst` as saved before the typed quantizer variables: one flat qparams dict
    per block of QuantParam ("<site>", "<site>_zero", "w_<linear>"), the kernels' scale paths pointing there."""
    import orbax.checkpoint as ocp

    from prefixquant_jax.quant.recipe import WEIGHT_NAMES

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(orbax_io.STATE, orbax_io.META))
    meta = orbax_io.read_metadata(src)
    old = lambda where, field: ("w_" + where if where in WEIGHT_NAMES else where + ("_zero" if field == "zero" else ""))
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(src, orbax_io.STATE))
    for layer in tree["layers"].values():
        layer["qparams"] = {old(w, f): a for w, q in layer["qparams"].items() for f, a in q.items()}
    for e in meta["variables"]:
        for key in ("path", "scale"):
            if key in e and len(e[key]) == 5 and e[key][2] == "qparams":
                e[key] = e[key][:3] + [old(*e[key][3:])]
        if len(e["path"]) == 4 and e["path"][2] == "qparams":
            e["type"] = "prefixquant_jax.model:QuantParam"
    meta["qparams"] = {i: {old(w, f): v for w, q in d.items() for f, v in q.items()} for i, d in meta["qparams"].items()}
    ocp.PyTreeCheckpointer().save(os.path.join(dst, orbax_io.STATE), tree)
    with open(os.path.join(dst, orbax_io.META), "w") as f:
        json.dump(meta, f)


def test_checkpoint_of_the_flat_qparams_layout_loads(quantized, saved, tmp_path):
    """A checkpoint written before scales and zero points were typed variables loads into the typed layout
    (codec.upgrade_qparams): the same variables, types Scale / ZeroPoint, bit-identical logits."""
    from prefixquant_jax.model import Scale, ZeroPoint

    old_dir = str(tmp_path / "old")
    _to_flat_qparams_layout(saved, old_dir)
    assert "w_q" in orbax_io.read_metadata(old_dir)["qparams"]["0"]
    new, old = pq.load(saved), pq.load(old_dir)
    for a, b in zip(new.model.layers, old.model.layers):
        assert sorted(a.qparams.keys()) == sorted(b.qparams.keys())
        for where, q in b.qparams.items():
            assert sorted(q.keys()) == sorted(a.qparams[where].keys())
            assert type(q["scale"]) is Scale and ("zero" not in q or type(q["zero"]) is ZeroPoint)
            for f, v in q.items():
                np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(a.qparams[where][f][...]))
    assert old.weights.keys() == new.weights.keys() and old.weights  # int4 codes found through the old scale paths
    toks = jnp.asarray(rng_tokens(12, new.config.vocab_size)[None])
    np.testing.assert_array_equal(np.asarray(old.apply(old.split()[1], toks)), np.asarray(new.apply(new.split()[1], toks)))
