"""Saved quantized models: the model's NNX state as an Orbax checkpoint plus JSON metadata.

Directory layout (format `prefixquant-quantized/2`):
  DIR/prefixquant.json        metadata, written last: its presence marks a complete checkpoint
  DIR/state/                  Orbax PyTree checkpoint: a nested dict of numpy arrays, one leaf per NNX variable, at
                              the variable's path with string keys (layers -> "3" -> qparams -> q -> scale)
  DIR/prefix_kv.safetensors   the FP prefix's K/V rows (the model's Prefix variables) in the prefix-file format of
                              checkpoints_convert.prefix_io (recipes with a prefix)
  DIR/tokenizer/              the tokenizer (`save_pretrained`), when one was given
The whole directory is written under a temporary name beside DIR and renamed when complete.

Weights: a kernel whose block has a weight scale qparams[<name>]["scale"] (symmetric, [1, out]) is stored as its
integer codes: int4 packed two per int8 byte along the input axis (`pallas_kernels.int4` layout) for 4-bit weight
specs, int8 for 8-bit ones; the load rebuilds kernel = codes * scale in float32, which the forward's fake
quantizer maps to itself, so logits are bit-identical. A kernel whose codes would not reproduce the forward's
value exactly (checked at save time) is stored in float, like every other variable. Each stored leaf carries a
CRC32 in the metadata, checked on load.

Metadata keys: format, recipe (quant.serial.encode: the QuantRecipe, FlatQuant's included), summary {name, method,
bits, rotated, prefix}, prefix {prefix_ids, text, length, k_rotated, file, crc32} or null, config (HF config.json
dict), dtype, variables [{path, type, shape, dtype, stored, scale?, crc32}], tokenizer, sizes {disk_bytes,
fp32_params_bytes}, report, versions. The module skeleton is rebuilt from `config` + `recipe` + `variables`:
nothing about the qparams or transforms keys (or other variable types) is hard-coded here.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from prefixquant_jax.checkpoint import codec
from prefixquant_jax.checkpoint.fp import load_prefix_kv, load_tokenizer, save_prefix_kv
from prefixquant_jax.errors import UserError, describe
from prefixquant_jax.files import atomic_dir, recover, writing
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import with_prefix
from prefixquant_jax.pipeline.result import QuantizedModel
from prefixquant_jax.quant.qarray import EPS, QArray
from prefixquant_jax.quant.serial import decode

FORMAT_NAME = "prefixquant-quantized"
FORMAT_VERSION = 2  # 2: the recipe (no separate preset), FlatQuant's typed transforms, the prefix as model state
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
META = "prefixquant.json"
STATE, PREFIX, TOKENIZER = "state", "prefix_kv.safetensors", "tokenizer"


def is_saved_quantized(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META))


def looks_saved(path: str) -> bool:
    """A saved checkpoint, or a damaged one (an Orbax `state/` and no HF config.json): route it to `load_quantized`."""
    return is_saved_quantized(path) or (os.path.isdir(os.path.join(path, STATE))
                                        and not os.path.isfile(os.path.join(path, "config.json")))


def check_save_target(path: str, overwrite: bool) -> str:
    """Refuse an existing target unless overwrite; never replace a directory that is not a checkpoint. A previous
    version a killed replacement left aside is put back first (files.recover)."""
    path = os.path.abspath(path)
    recover(path)
    if os.path.lexists(path):
        if not overwrite:
            raise UserError(f"{path} already exists (pass overwrite=True to replace it)", "overwrite=True")
        if not os.path.isdir(path) or (os.listdir(path) and not is_saved_quantized(path)):
            raise UserError(f"{path} exists and is not a prefixquant checkpoint; refusing to replace it")
    return path


def save_quantized(qm: QuantizedModel, path: str, overwrite: bool = False, tokenizer=None) -> str:
    """Write `qm` to directory `path` atomically; returns the absolute path."""
    check_save_target(path, overwrite)  # before any work
    leaves = codec.stored_leaves(qm)
    tree, variables = {}, []
    for p, cls, a, stored, enc, sp in leaves:
        node = tree
        for k in p[:-1]:
            node = node.setdefault(str(k), {})
        node[str(p[-1])] = stored
        entry = {"path": list(p), "type": codec.type_name(cls), "shape": list(a.shape), "dtype": str(a.dtype),
                 "stored": enc, "crc32": codec.crc(stored)}
        if sp is not None:
            entry["scale"] = list(sp)
        variables.append(entry)
    with atomic_dir(path) as tmp:  # disk full, permissions, a kill: the target is left as it was
        _fill(tmp, path, qm, tokenizer, tree, variables, leaves)
    return os.path.abspath(path)


def _fill(tmp, path, qm, tokenizer, tree, variables, leaves) -> None:
    """Write tokenizer, prefix KV, Orbax state and (last) the metadata into the temp dir `tmp`."""
    with writing(path):
        tok = _save_tokenizer(qm, tokenizer, tmp)
    prefix = None
    pkv = qm.prefix_kv
    if pkv is not None:
        f = save_prefix_kv(pkv, os.path.join(tmp, PREFIX))
        prefix = {"prefix_ids": list(pkv.prefix_ids), "text": pkv.text, "length": pkv.length,
                  "k_rotated": bool(pkv.k_rotated), "file": PREFIX, "crc32": codec.file_crc(f)}
    _write_state(os.path.join(tmp, STATE), tree, path)
    meta = {"format": FORMAT, **codec.metadata(qm, variables, prefix, tok)}
    meta["sizes"] = {"disk_bytes": codec.dir_bytes(tmp),
                     "fp32_params_bytes": sum(4 * a.size for p, cls, a, *_ in leaves if codec.type_name(cls) == "flax.nnx:Param")}
    with open(os.path.join(tmp, META), "w") as fh:
        json.dump(meta, fh, indent=1)


def _write_state(directory: str, tree: dict, target: str) -> None:
    try:
        if jax.process_count() > 1:  # several processes (quantize --coordinator): the caller alone writes host values
            me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
            tree = jax.tree.map(np.asarray, tree)
            ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=me), multiprocessing_options=me).save(directory, tree)
        else:
            ocp.PyTreeCheckpointer().save(directory, tree)
    except Exception as e:  # tensorstore reports a full disk or a read-only target as ValueError / RuntimeError
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot write {os.path.abspath(target)}: {text}") from None


def _save_tokenizer(qm, tokenizer, tmp):
    dest = os.path.join(tmp, TOKENIZER)
    if tokenizer is not None:
        try:
            tokenizer.save_pretrained(dest)
        except OSError:
            raise  # a full disk or a read-only target: `cannot write PATH` (_fill)
        except Exception as e:
            raise UserError(f"cannot save the tokenizer ({describe(e)})") from None
        return TOKENIZER
    src = (qm.report or {}).get("loaded_from")
    if src and os.path.isdir(os.path.join(src, TOKENIZER)):  # re-saving a loaded model keeps its tokenizer
        shutil.copytree(os.path.join(src, TOKENIZER), dest)
        return TOKENIZER
    return None


def read_metadata(path: str) -> dict:
    """The metadata of the checkpoint directory `path`, after checking its format name and version."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint directory {path!r} does not exist")
    mpath = os.path.join(path, META)
    if not os.path.isdir(path) or not os.path.isfile(mpath):
        raise UserError(f"{path}: not a prefixquant checkpoint (no {META})")
    try:
        with open(mpath) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{mpath}: unreadable or truncated metadata ({describe(e)})") from None
    fmt = str(meta.get("format")) if isinstance(meta, dict) else repr(type(meta).__name__)
    name, _, version = fmt.partition("/")
    if name != FORMAT_NAME:
        raise UserError(f"{mpath}: not a prefixquant checkpoint (format {fmt!r}, expected {FORMAT!r})")
    if version != str(FORMAT_VERSION):
        raise UserError(f"{mpath}: format version {version!r} is not supported (this version reads {FORMAT!r}; "
                        "quantize the model again)")
    for key in ("recipe", "config", "dtype", "variables"):
        if key not in meta:
            raise UserError(f"{mpath}: metadata has no {key!r}")
    return meta


def load_quantized(path: str, dtype=None) -> QuantizedModel:
    """Rebuild the QuantizedModel saved in directory `path` (report["loaded_from"] = path). `dtype` (default: the
    saved one) is the dtype of the base parameters; qparams keep theirs."""
    path = os.path.abspath(path)
    meta = read_metadata(path)
    src = os.path.join(path, META)
    try:
        config = ModelConfig.from_hf_dict(meta["config"], source=src)
        recipe = decode(meta["recipe"], src)
        values = _restore_values(path, meta)
        model = codec.rebuild(config, values, meta, dtype or jnp.dtype(meta["dtype"]), recipe, src)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{src}: malformed metadata ({describe(e)})") from None
    prefix = load_saved_prefix(path, meta, config)
    if prefix is not None:
        model = with_prefix(model, prefix)
    report = dict(meta.get("report") or {})
    report["loaded_from"] = path
    return QuantizedModel(model=model, report=report)


def _restore_values(path: str, meta: dict) -> dict:
    """{variable path: float array as the model holds it}, after the CRC check; a kernel stored as codes comes back
    dequantized (quant/qarray.py)."""
    sdir = os.path.join(path, STATE)
    if not os.path.isdir(sdir):
        raise UserError(f"{sdir}: missing (incomplete checkpoint)")
    try:
        tree = ocp.PyTreeCheckpointer().restore(sdir)
    except Exception as e:  # tensorstore / orbax raise many types for missing or damaged files
        raise UserError(f"{sdir}: cannot read the Orbax checkpoint, truncated or corrupted ({describe(e)})") from None
    stored = {}
    for e in meta["variables"]:
        p, node = tuple(e["path"]), tree
        for k in p:
            if not isinstance(node, dict) or str(k) not in node:
                raise UserError(f"{sdir}: variable {codec.dotted(p)} is missing (corrupted checkpoint)")
            node = node[str(k)]
        stored[p] = np.asarray(node)
        if codec.crc(stored[p]) != e["crc32"]:
            raise UserError(f"{sdir}: checksum mismatch for {codec.dotted(p)} (corrupted checkpoint)")
    values = {}
    for e in meta["variables"]:
        p, a = tuple(e["path"]), stored[tuple(e["path"])]
        if e["stored"] in ("int4", "int8"):
            scale = np.maximum(np.asarray(stored[tuple(e["scale"])], np.float32), np.float32(EPS))
            q = QArray(qvalue=a, scale=scale, zero_point=None, bits=4 if e["stored"] == "int4" else 8,
                       granularity="channel", packed_axis=0 if e["stored"] == "int4" else None)
            a = np.asarray(q.dequantize())
        elif e["stored"] != "raw":
            raise UserError(f"{sdir}: unknown encoding {e['stored']!r} of {codec.dotted(p)}")
        if list(a.shape) != list(e["shape"]) or str(a.dtype) != e["dtype"]:
            raise UserError(f"{sdir}: {codec.dotted(p)} is {a.dtype}{list(a.shape)}, metadata says {e['dtype']}{e['shape']}")
        values[p] = a
    return values


def load_saved_prefix(path: str, meta: dict | None = None, config=None):
    """The checkpoint's FP prefix (a PrefixKV; None when its recipe has no prefix), CRC-checked."""
    meta = read_metadata(path) if meta is None else meta
    info = meta.get("prefix")
    if not info:
        return None
    f = os.path.join(path, info.get("file", PREFIX))
    if not os.path.isfile(f):
        raise UserError(f"{f}: missing (incomplete checkpoint)")
    if "crc32" in info and codec.file_crc(f) != info["crc32"]:
        raise UserError(f"{f}: checksum mismatch (corrupted checkpoint)")
    return load_prefix_kv(f, config)


def saved_tokenizer(path: str, meta: dict | None = None):
    """The tokenizer saved with the checkpoint (UserError when there is none)."""
    meta = read_metadata(path) if meta is None else meta
    if not meta.get("tokenizer"):
        raise UserError(f"{path}: no tokenizer was saved with this checkpoint (save it with tokenizer=...)")
    return load_tokenizer(os.path.join(path, meta["tokenizer"]), "hf")
