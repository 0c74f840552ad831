"""Saved quantized checkpoints (prefixquant_jax.checkpoint.saved, format 2): exact round trip (the recipe in the
metadata, the prefix file, FlatQuant's typed transforms), CLI --save / --model DIR, export-prefix /
--import-prefix, atomic writes and one-line errors for damaged checkpoints (format 1 included)."""
import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prefixquant_jax as pq
from prefixquant_jax.checkpoint import saved as orbax_io
from prefixquant_jax.errors import UserError
from tests.cli.util import assert_one_line_error, main_cli
from tests.conftest import rng_tokens


@pytest.fixture(scope="module")
def quantized(tiny_quantized, tiny_ck):
    """The session's tiny w4a4kv4-static model (prefix [1]) and the tiny tokenizer. Shared: never changed here."""
    return tiny_quantized("w4a4kv4-static"), tiny_ck.tokenizer()


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    qm, tok = quantized
    return pq.save(qm, str(tmp_path_factory.mktemp("saved") / "q"), tokenizer=tok)


def jit_logits_and_ppl(graphdef, qm, tok=None, text_file=None, n=12):
    """Logits of one window (and ppl over 2 windows when tok is given) of qm's model through the jitted
    eval.forward.logits of `graphdef`, which qm's model must equal: the same jitted program for both models."""
    from prefixquant_jax.eval import forward
    from prefixquant_jax.eval.data import load_text, tokenize, windows
    from prefixquant_jax.eval.perplexity import perplexity

    g, state = nnx.split(qm.model)
    assert g == graphdef  # structure, recipe, config and prefix ids are equal too
    win = jnp.asarray(rng_tokens(n, qm.config.vocab_size)[None])
    out, _ = forward.logits(graphdef, state, win, qm.model.init_cache(1, n))
    if tok is None:
        return np.asarray(out), None
    ws = windows(tokenize(tok, load_text(text_file)), 32, 2)
    return np.asarray(out), perplexity(qm.model, ws, progress=False)["ppl"]


def kinds(meta):
    return {tuple(e["path"]): e["stored"] for e in meta["variables"]}


def test_round_trip_identical_logits_and_ppl(quantized, saved, text_file):
    qm, tok = quantized
    back = pq.load(saved)
    assert back.fp_blocks is None and back.recipe == qm.recipe and back.config == qm.config
    assert back.model.layers[0].recipe == qm.model.layers[0].recipe
    assert back.prefix_kv.prefix_ids == (1,) and back.prefix_kv.k_rotated
    for x, y in zip(qm.prefix_kv.k + qm.prefix_kv.v, back.prefix_kv.k + back.prefix_kv.v):
        np.testing.assert_array_equal(x, y)
    for a, b in zip(qm.model.layers, back.model.layers):
        assert sorted(a.qparams.keys()) == sorted(b.qparams.keys())
    graphdef = nnx.graphdef(qm.model)
    la, pa = jit_logits_and_ppl(graphdef, qm, tok, text_file)
    lb, pb = jit_logits_and_ppl(graphdef, back, orbax_io.saved_tokenizer(saved), text_file)
    np.testing.assert_array_equal(la, lb)
    assert pa == pb

    meta = json.loads(open(os.path.join(saved, orbax_io.META)).read())
    assert meta["format"] == "prefixquant-quantized/2" and "preset" not in meta
    from prefixquant_jax.quant.serial import decode
    assert decode(meta["recipe"], "meta") == qm.recipe  # the recipe itself, not a preset name
    s = meta["summary"]
    assert s["name"] == "w4a4kv4-static" and s["method"] == "prefixquant" and s["rotated"] and s["prefix"]
    assert s["bits"] == {"w": 4, "a": 4, "kv": 4} and meta["report"]["seed"] == 0
    assert qm.recipe.spec("k_cache").granularity == "head"
    assert meta["prefix"]["prefix_ids"] == [1] and "token_ids" not in meta["prefix"]
    assert meta["prefix"]["file"] == orbax_io.PREFIX and os.path.isfile(os.path.join(saved, orbax_io.PREFIX))
    assert not any("prefix" in str(p) for p in kinds(meta))  # the prefix rows are in their file, not the state
    layer0 = {e["path"][3] for e in meta["variables"] if e["path"][:3] == ["layers", 0, "qparams"]}
    assert layer0 == set(qm.model.layers[0].qparams.keys())
    k = kinds(meta)
    assert "q" in qm.model.layers[0].qparams  # weights with a scale are stored as packed int4 codes
    assert k[("layers", 0, "attn", "q", "kernel")] == "int4" and k[("embed",)] == "raw"
    import orbax.checkpoint as ocp
    raw = ocp.PyTreeCheckpointer().restore(os.path.join(saved, orbax_io.STATE))
    assert raw["layers"]["0"]["attn"]["q"]["kernel"].dtype == np.int8
    assert raw["layers"]["0"]["attn"]["q"]["kernel"].shape == (qm.config.hidden_size // 2, qm.config.num_heads * qm.config.head_dim)
    assert meta["sizes"]["disk_bytes"] < 0.7 * meta["sizes"]["fp32_params_bytes"]


def test_packed_runtime_takes_the_stored_codes(quantized, saved):
    """The int4 codes the runtime packs from a loaded model are the stored codes, and a fresh pack of the original
    model's; a kernel changed after loading is re-encoded from the model (pack always encodes the model's kernel)."""
    import orbax.checkpoint as ocp

    from prefixquant_jax.nn.decoder import WEIGHT_NAMES

    qm, _ = quantized
    back = pq.load(saved)
    raw = ocp.PyTreeCheckpointer().restore(os.path.join(saved, orbax_io.STATE))
    o = back.weight(0, "o").pack(axis=0)
    assert o.bits == 4 and o.packed_axis == 0
    np.testing.assert_array_equal(np.asarray(o.qvalue), raw["layers"]["0"]["attn"]["o"]["kernel"])
    fresh, loaded = pq.pack(qm, backend="xla"), pq.pack(back, backend="xla")
    np.testing.assert_array_equal(np.asarray(loaded.layers[0].attn.o.kernel[...]), raw["layers"]["0"]["attn"]["o"]["kernel"])
    for a, b in zip(fresh.layers, loaded.layers):
        for name in WEIGHT_NAMES:
            np.testing.assert_array_equal(np.asarray(a.linear_module(name).kernel[...]),
                                          np.asarray(b.linear_module(name).kernel[...]))
    k = back.model.layers[0].attn.o.kernel  # `back` is this test's own model
    k[...] = k[...] * 2.0  # the model no longer holds the stored codes' kernel
    again = np.asarray(pq.pack(back, backend="xla").layers[0].attn.o.kernel[...])
    assert not np.array_equal(again, raw["layers"]["0"]["attn"]["o"]["kernel"])


def test_int8_weights_and_extra_variables(quantized, tmp_path):
    """w_bits 8 stores int8 codes; a variable of another type in a new container survives the round trip."""
    from prefixquant_jax.nn.decoder import WEIGHT_NAMES, with_recipe
    from prefixquant_jax.quant.spec import QuantSpec

    qm, tok = quantized
    spec8 = QuantSpec(bits=8, granularity="channel", symmetric=True)
    model = with_recipe(nnx.clone(qm.model), qm.recipe.replace(weight=spec8))  # a copy: the shared model stays
    for b in model.layers:
        for n in WEIGHT_NAMES:
            w = np.asarray(b.linear_module(n).kernel[...])
            b.set_quantizer(n, jnp.asarray(np.abs(w).max(axis=0, keepdims=True) * 0.9 / 127))
    model.layers[1].extra = nnx.Dict()
    model.layers[1].extra["t"] = nnx.BatchStat(jnp.arange(6.0).reshape(2, 3))
    q8 = qm.replace(model=model)
    assert q8.recipe.w_bits == 8
    back = pq.load(pq.save(q8, str(tmp_path / "q8")))
    meta = orbax_io.read_metadata(str(tmp_path / "q8"))
    assert kinds(meta)[("layers", 1, "mlp", "down", "kernel")] == "int8" and meta["tokenizer"] is None
    assert meta["summary"]["bits"]["w"] == 8 and back.recipe == q8.recipe
    assert isinstance(back.model.layers[1].extra["t"], nnx.BatchStat)
    np.testing.assert_array_equal(np.asarray(back.model.layers[1].extra["t"][...]), np.arange(6.0).reshape(2, 3))
    graphdef = nnx.graphdef(q8.model)
    np.testing.assert_array_equal(jit_logits_and_ppl(graphdef, q8)[0], jit_logits_and_ppl(graphdef, back)[0])


def test_flatquant_transforms_round_trip(tiny_quantized, tmp_path):
    """A (merged) FlatQuant model: its recipe, and every typed transform variable (Factor, ClipLogit, ...) by site,
    come back with their types and bits; the logits are identical."""
    from prefixquant_jax.flatquant.recipe import FlatQuantRecipe

    qm = tiny_quantized("flatquant-w4a4kv4")
    back = pq.load(pq.save(qm, str(tmp_path / "flat")))
    assert isinstance(back.recipe, FlatQuantRecipe) and back.recipe == qm.recipe and back.recipe.merged
    for a, b in zip(qm.model.layers, back.model.layers):
        ta, tb = nnx.to_flat_state(nnx.state(a.transforms)), nnx.to_flat_state(nnx.state(b.transforms))
        ta, tb = {tuple(p): v for p, v in ta}, {tuple(p): v for p, v in tb}
        assert ta.keys() == tb.keys() and ("qkv_in", "left") in ta and ("qkv_in", "clip_max") in ta
        for p, v in ta.items():
            assert type(tb[p]) is type(v), p
            np.testing.assert_array_equal(np.asarray(tb[p][...]), np.asarray(v[...]))
    graphdef = nnx.graphdef(qm.model)
    np.testing.assert_array_equal(jit_logits_and_ppl(graphdef, qm)[0], jit_logits_and_ppl(graphdef, back)[0])


def test_cli_save_eval_export_import(tiny_dir, tmp_path, text_file, capsys):
    src, A, B = tmp_path / "src", str(tmp_path / "A"), str(tmp_path / "B")
    shutil.copytree(tiny_dir, src)
    common = ["--preset", "w4a4kv4-static", "--model", str(src), "--calib-data", text_file, "--calib-samples", "4",
              "--calib-seqlen", "32", "--eval-data", text_file, "--seqlen", "32", "--max-windows", "2", "--no-fp"]
    r = main_cli(capsys, "quantize", *common, "--prefix-ids", "1", "--save", A, "--json", tmp_path / "qa.json")
    assert r.returncode == 0, r.stderr[-3000:]
    qa = json.loads((tmp_path / "qa.json").read_text())
    assert qa["saved"] == A and os.path.isfile(os.path.join(A, "tokenizer", "tokenizer.json"))
    assert qa["recipe"] == "w4a4kv4-static" and "preset" not in qa and "prefix_tokens" not in qa

    pfile = str(tmp_path / "p.safetensors")
    r = main_cli(capsys, "export-prefix", "--model", A, "--out", pfile)
    assert r.returncode == 0, r.stderr[-3000:]
    r = main_cli(capsys, "quantize", *common, "--import-prefix", pfile, "--no-eval", "--save", B)
    assert r.returncode == 0, r.stderr[-3000:]
    meta_a, meta_b = orbax_io.read_metadata(A), orbax_io.read_metadata(B)
    assert meta_b["report"]["outliers"]["source"] == "imported"
    assert meta_a["variables"] == meta_b["variables"]  # every stored array has the same CRC: the same model
    pa, pb = orbax_io.load_saved_prefix(A), orbax_io.load_saved_prefix(B)
    assert pa.prefix_ids == pb.prefix_ids == (1,) and pa.text == pb.text and pa.k_rotated and pb.k_rotated
    for x, y in zip(pa.k + pa.v, pb.k + pb.v):
        np.testing.assert_array_equal(x, y)

    shutil.rmtree(src)  # from here on only the saved directories exist
    r = main_cli(capsys, "eval", "--model", A, "--data", text_file, "--seqlen", "32", "--max-windows", "2", "--json",
                 tmp_path / "e.json")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["ppl"] == qa["ppl"] and ev["windows"] == qa["windows"] and ev["recipe"] == "w4a4kv4-static"
    r = main_cli(capsys, "eval", "--model", B, "--import-prefix", pfile, "--data", text_file, "--seqlen", "32",
                 "--max-windows", "2", "--json", tmp_path / "e2.json")
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
    elif kind in ("version", "format-1", "format"):
        meta = json.loads(open(meta_path).read())
        meta["format"] = {"version": "prefixquant-quantized/99", "format-1": "prefixquant-quantized/1",
                          "format": "something-else/1"}[kind]
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
    ("format-1", "format version '1' is not supported"),  # saved by the old layout: refused, no upgrade path
    ("format", "not a prefixquant checkpoint"), ("truncated-metadata", "truncated metadata"),
    ("missing-prefix", "missing"), ("missing-metadata", "not a prefixquant checkpoint"),
    ("missing-data", "cannot read the Orbax checkpoint")])
def test_damaged_checkpoint_one_line_error(saved, tmp_path, capsys, kind, message):
    d = str(tmp_path / "bad")
    shutil.copytree(saved, d)
    _damage(d, kind)
    assert_one_line_error(main_cli(capsys, "eval", "--model", d, "--seqlen", "32", "--max-windows", "1"), message)


def test_missing_checkpoint_dir(tmp_path, capsys):
    assert_one_line_error(main_cli(capsys, "export-prefix", "--model", tmp_path / "nope", "--out", tmp_path / "p"),
                          "is not an existing directory")
    with pytest.raises(UserError, match="does not exist"):
        pq.load(str(tmp_path / "nope"))


def test_interrupted_save_leaves_nothing(quantized, saved, tmp_path, monkeypatch):
    qm, tok = quantized
    real = orbax_io._write_state

    def write_then_die(directory, tree, target):
        real(directory, tree, target)  # the state is on disk, the metadata is not: as if killed mid-way
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
    assert pq.load(str(old / "q")).recipe == qm.recipe


def test_save_refuses_existing_dir(tiny_dir, quantized, saved, tmp_path, capsys):
    qm, _ = quantized
    d = tmp_path / "q"
    shutil.copytree(saved, d)
    before = (d / orbax_io.META).read_bytes()
    r = main_cli(capsys, "quantize", "--model", tiny_dir, "--preset", "w4a4kv4-static", "--save", d, "--no-eval")
    assert_one_line_error(r, "already exists")
    assert (d / orbax_io.META).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["q"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to replace"):
        pq.save(qm, str(other), overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    pq.save(qm, str(d), overwrite=True)  # a checkpoint is replaced with --overwrite
    assert pq.load(str(d)).prefix_kv.prefix_ids == (1,)


def test_import_prefix_mismatch(tiny_ck, tiny_dir, tmp_path, capsys):
    from prefixquant_jax.checkpoint.fp import save_prefix_kv
    from prefixquant_jax.nn.decoder import Decoder
    from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv

    ck = tiny_ck
    plain = compute_prefix_kv(Decoder(ck.config, ck.params), [1, 5])  # unrotated: k_rotated False
    f = save_prefix_kv(plain, str(tmp_path / "plain.safetensors"))
    args = ["quantize", "--model", tiny_dir, "--no-eval"]
    assert_one_line_error(main_cli(capsys, *args, "--preset", "w4a4kv4-static", "--import-prefix", f), "unrotated model")
    assert_one_line_error(main_cli(capsys, *args, "--preset", "quarot-w4a4kv4", "--import-prefix", f), "uses no prefix")
    narrow = dataclasses.replace(plain, k=[k[..., :8] for k in plain.k], v=[v[..., :8] for v in plain.v], k_rotated=True)
    g = save_prefix_kv(narrow, str(tmp_path / "narrow.safetensors"))
    assert_one_line_error(main_cli(capsys, *args, "--preset", "w4a4kv4-static", "--import-prefix", g), "does not fit")
