"""Helpers of the saved-checkpoint format (`checkpoint.saved`): checksums, weight codes, the stored leaves, metadata,
and the model rebuilt from them.

- `weight_codes(kernel, scale, spec)`: integer weight codes (quant.qarray.quantize) whose float32 dequantization is
  bit-identical to the forward's fake-quantized kernel; checkpoint/saved.py loads them back as float kernels.
- `stored_leaves(qm)`: every NNX variable (the prefix's excepted: it has its own file) with the array to store and
  its encoding (raw / int4 / int8).
- `metadata(qm, ...)`: the JSON metadata; `rebuild(config, values, meta, ...)`: the Decoder skeleton from the base
  parameters, then every other saved variable (any key, any Variable type) placed at its path.
"""
from __future__ import annotations

import os
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.errors import UserError, describe
from prefixquant_jax.nn.decoder import LINEAR_MODULES, Decoder
from prefixquant_jax.nn.variables import Prefix
from prefixquant_jax.quant.qarray import quantize
from prefixquant_jax.quant.serial import encode, resolve, type_name


def dotted(path) -> str:
    return ".".join(map(str, path))


def crc(a: np.ndarray) -> int:
    """CRC32 of an array's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(x) for x in obj]
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return obj.tolist()
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


def weight_codes(kernel, scale, spec):
    """The QArray of `kernel` under `scale` (quant.qarray.quantize, the forward's encoder; int8 codes, unpacked), or
    None when codes * scale would not give back, bit for bit, the kernel the forward uses (storing the codes would
    then change the model)."""
    kernel, scale = np.asarray(kernel), np.asarray(scale)
    if kernel.dtype != np.float32 or kernel.ndim != 2 or scale.shape != (1, kernel.shape[1]):
        return None
    q = quantize(jnp.asarray(kernel), spec.replace(dynamic=False), scale=jnp.asarray(scale))
    used = np.asarray(q.dequantize())
    again = np.asarray(quantize(jnp.asarray(used), spec.replace(dynamic=False), scale=jnp.asarray(scale)).dequantize())
    return q if np.array_equal(again, used) else None


def file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def storable_weight(recipe):
    """The static per-channel symmetric 4- or 8-bit weight quantizer whose codes can be stored, else None."""
    spec = getattr(recipe, "weight", None)
    ok = spec is not None and spec.symmetric and not spec.dynamic and spec.granularity == "channel"
    return spec if ok and spec.bits in (4, 8) else None


def flat_state(model) -> list:
    """[(path, Variable)] of every variable of `model` except sown intermediates and the prefix rows."""
    return list(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Any(nnx.Intermediate, Prefix)))))


def stored_leaves(qm):
    """[(path, variable class, original array, stored array, encoding, scale path)] for every variable."""
    flat = {tuple(p): v for p, v in flat_state(qm.model)}
    arrays = {p: np.asarray(v[...]) for p, v in flat.items()}
    spec, out = storable_weight(qm.recipe), []
    for p, v in flat.items():
        a, stored, enc, scale_path = arrays[p], arrays[p], "raw", None
        if spec is not None and len(p) == 5 and p[0] == "layers" and p[4] == "kernel" and LINEAR_MODULES.get(p[3]) == p[2]:
            sp = ("layers", p[1], "qparams", p[3], "scale")
            q = weight_codes(a, arrays[sp], spec) if sp in arrays else None
            if q is not None:
                scale_path = sp
                if spec.bits == 4 and a.shape[0] % 2 == 0:
                    stored, enc = np.asarray(q.pack(axis=0).qvalue), "int4"
                else:
                    stored, enc = np.asarray(q.qvalue), "int8"
        out.append((p, type(v), a, stored, enc, scale_path))
    return out


def metadata(qm, variables, prefix, tok) -> dict:
    """The metadata of `qm` (layout in `checkpoint.saved`), except format and sizes."""
    report = dict(qm.report or {})
    report.pop("loaded_from", None)
    recipe = qm.recipe
    return {
        "recipe": encode(recipe),
        "summary": {"name": recipe.name, "method": recipe.method, "bits": {"w": recipe.w_bits, "a": recipe.a_bits,
                                                                          "kv": recipe.kv_bits},
                    "rotated": recipe.rotate, "prefix": recipe.prefix},
        "prefix": prefix, "config": qm.config.to_hf_dict(), "dtype": str(np.dtype(qm.model.dtype)),
        "variables": variables, "tokenizer": tok, "report": jsonable(report),
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }


def rebuild(config, values: dict, meta: dict, dtype, recipe, src: str) -> Decoder:
    """The Decoder skeleton from the base parameters, then every other saved variable placed at its path."""
    def get(*p):
        if p not in values:
            raise UserError(f"{src}: the checkpoint has no {dotted(p)}")
        return values[p]

    layers = {i: {"input_norm": get("layers", i, "input_norm", "weight"), "post_norm": get("layers", i, "post_norm", "weight"),
                  "attn": {}, "mlp": {}}
              for i in range(config.num_layers)}
    for i, lp in layers.items():  # the kernels, then the family's q/k/v biases and q/k norms (config.FAMILIES)
        for n, module in LINEAR_MODULES.items():
            lp[module][n] = get("layers", i, module, n, "kernel")
        if config.attention_bias:
            lp["attn"].update({n + "_bias": get("layers", i, "attn", n, "bias") for n in ("q", "k", "v")})
        if config.qk_norm:
            lp["attn"].update({n + "_norm": get("layers", i, "attn", n + "_norm", "weight") for n in ("q", "k")})
    params = {"embed": get("embed"), "final_norm": get("final_norm", "weight"), "layers": layers}
    if not config.tie_word_embeddings:
        params["lm_head"] = get("lm_head")
    model = Decoder(config, params, dtype, recipe)
    have = {tuple(p): type(v) for p, v in flat_state(model)}
    for e in meta["variables"]:
        p, cls = tuple(e["path"]), resolve(e["type"], src)
        if p in have:
            if have[p] is not cls:
                raise UserError(f"{src}: {dotted(p)} is a {e['type']} in the checkpoint, a {type_name(have[p])} in the model")
        else:
            place(model, p, cls(jnp.asarray(values[p])), src)
    missing = sorted(set(have) - {tuple(e["path"]) for e in meta["variables"]}, key=str)
    if missing:
        raise UserError(f"{src}: the checkpoint lacks model variable {dotted(missing[0])}")
    return model


def place(model, path: tuple, var, src: str) -> None:
    """Set `var` at `path`, creating nnx.Dict containers on the way (as calibration fills `qparams`)."""
    node = model
    try:
        for k in path[:-1]:
            if isinstance(k, int) or isinstance(node, nnx.Dict):
                if isinstance(node, nnx.Dict) and k not in node:
                    node[k] = nnx.Dict()
                node = node[k]
            else:
                if not hasattr(node, k):
                    setattr(node, k, nnx.Dict())
                node = getattr(node, k)
        if isinstance(node, nnx.Dict):
            node[path[-1]] = var
        else:
            setattr(node, path[-1], var)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{src}: cannot place {dotted(path)} in the model ({describe(e)})") from None
