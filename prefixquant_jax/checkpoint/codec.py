"""Helpers of the saved-checkpoint format (`checkpoint.saved`): checksums, class names, recipe JSON, weight codes.

- `type_name(cls)` / `resolve(name)`: a class as "module:qualname" ("flax.nnx:Param" for NNX's own
  variable types); only flax.nnx and prefixquant_jax classes are ever imported back.
- `encode(recipe)` / `decode(obj)`: a frozen dataclass tree as JSON, {"__class__": name, field: value},
  tuples as lists (decoded back to tuples so the recipe stays hashable).
- `weight_codes(kernel, scale, spec)`: integer weight codes (quant.qarray.quantize) whose float32
  dequantization is bit-identical to the forward's fake-quantized kernel; checkpoint/saved.py loads them
  back as QArrays.
- `stored_leaves(qm)`: every NNX variable with the array to store and its encoding (raw / int4 / int8).
- `metadata(qm, ...)`: the JSON metadata; `rebuild(config, values, meta, ...)`: the Llama skeleton from
  the base parameters, then every other saved variable (any key, any Variable type) placed at its path.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import zlib

import numpy as np

from prefixquant_jax.errors import UserError, describe
from prefixquant_jax.quant.recipe import LINEAR_MODULES


def dotted(path) -> str:
    return ".".join(map(str, path))


def crc(a: np.ndarray) -> int:
    """CRC32 of an array's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def type_name(cls) -> str:
    from flax import nnx
    if getattr(nnx, cls.__name__, None) is cls:
        return f"flax.nnx:{cls.__name__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve(name: str, source: str):
    """A class named `module:qualname`, imported only from flax.nnx or this package."""
    mod, _, qual = str(name).partition(":")
    if mod != "flax.nnx" and mod.split(".")[0] != "prefixquant_jax":
        raise UserError(f"{source}: refusing to import {name!r} (only flax.nnx and prefixquant_jax classes)")
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise UserError(f"{source}: unknown class {name!r} (saved by a newer version?)") from None
    return obj


def encode(obj):
    """JSON form of a frozen recipe: dataclasses tagged by class, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__class__": type_name(type(obj)),
                **{f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}}
    if isinstance(obj, (list, tuple)):
        return [encode(x) for x in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise UserError(f"cannot save a recipe holding a {type(obj).__name__}")


# recipe fields of older saves that are no longer fields (capture is the Capture wrapper now), read when unset
RETIRED_FIELDS = ("capture", "capture_gram", "capture_qkv")
LEGACY_QUANT_PARAM = "prefixquant_jax.model:QuantParam"  # every quantizer variable's type in the flat qparams layout


def decode(obj, source: str):
    """Inverse of `encode`; lists come back as tuples (recipes are hashable)."""
    if isinstance(obj, dict) and "__class__" in obj:
        cls = resolve(obj["__class__"], source)
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        obj = {k: v for k, v in obj.items() if not (k in RETIRED_FIELDS and k not in names and v is False)}
        try:
            return cls(**{k: decode(v, source) for k, v in obj.items() if k != "__class__"})
        except TypeError as e:
            raise UserError(f"{source}: cannot rebuild {obj['__class__']} ({describe(e)})") from None
    if isinstance(obj, list):
        return tuple(decode(x, source) for x in obj)
    return obj


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(x) for x in obj]
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return obj.tolist()
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


def weight_codes(kernel, scale, spec):
    """The QArray of `kernel` under `scale` (quant.qarray.quantize, the forward's encoder; int8 codes,
    unpacked), or None when codes * scale would not give back, bit for bit, the kernel the forward uses
    (storing the codes would then change the model)."""
    import jax.numpy as jnp

    from prefixquant_jax.quant.qarray import quantize

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


def weight_spec(qm):
    """The static per-channel symmetric 4- or 8-bit weight quantizer whose codes can be stored, else None."""
    recipe = qm.model.layers[0].recipe if len(qm.model.layers) else None
    spec = getattr(recipe, "weight", None) or qm.preset.weight_spec()
    ok = spec is not None and spec.symmetric and not spec.dynamic and spec.granularity == "channel"
    return spec if ok and spec.bits in (4, 8) else None


def flat_state(model) -> list:
    """[(path, Variable)] of every variable of `model` except sown intermediates."""
    from flax import nnx
    return list(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Intermediate))))


def stored_leaves(qm):
    """[(path, variable class, original array, stored array, encoding, scale path)] for every variable."""
    flat = {tuple(p): v for p, v in flat_state(qm.model)}
    arrays = {p: np.asarray(v[...]) for p, v in flat.items()}
    spec, out = weight_spec(qm), []
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


def metadata(qm, variables, qparams, prefix, tok) -> dict:
    """The metadata of `qm` (layout in `checkpoint.saved`), except format and sizes."""
    import flax
    import jax

    preset, config, report = qm.preset, qm.config, dict(qm.report or {})
    report.pop("loaded_from", None)
    recipe = qm.model.layers[0].recipe if len(qm.model.layers) else None
    quantizers = {s: dataclasses.asdict(spec) for s, spec in getattr(recipe, "sites", ())}
    if getattr(recipe, "weight", None) is not None:
        quantizers["weight"] = dataclasses.asdict(recipe.weight)
    eta = report.get("eta", (report.get("outliers") or {}).get("eta"))
    return {
        "method": getattr(preset, "method", "prefixquant"),
        "preset": dataclasses.asdict(preset),
        "bits": {"w": preset.w_bits, "a": preset.a_bits, "kv": preset.kv_bits},
        "quantizers": quantizers,
        "rotation": {"rotated": preset.rotate, "r3": bool(getattr(recipe, "r3", False)), "r4": bool(getattr(recipe, "r4", False)),
                     "seed": report.get("seed"), "hadamard": {"hidden (R1)": config.hidden_size,
                                                              "head (R2, R3)": config.head_dim, "ffn (R4)": config.intermediate_size}},
        "eta": eta, "prefix": prefix, "config": config.to_hf_dict(),
        "model": {"dtype": str(np.dtype(qm.model.dtype)), "recipe": encode(recipe)},
        "qparams": qparams, "variables": variables, "tokenizer": tok, "report": jsonable(report),
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }


def rebuild(config, values: dict, meta: dict, dtype, recipe, src: str):
    """The Llama skeleton from the base parameters, then every other saved variable placed at its path."""
    import jax.numpy as jnp

    from prefixquant_jax.model import Llama

    meta, values = upgrade_qparams(meta, values)

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
    model = Llama.from_params(config, params, dtype, recipe)
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


def upgrade_qparams(meta: dict, values: dict) -> tuple[dict, dict]:
    """(meta, values) with the flat qparams layout of older saves mapped to the typed one: layers/i/qparams/<key>
    (all QuantParam) -> layers/i/qparams/<where>/scale (Scale) or .../zero (ZeroPoint), model.legacy_qparams_key."""
    from prefixquant_jax.model import Scale, ZeroPoint, legacy_qparams_key

    variables, values = [], dict(values)
    for e in meta["variables"]:
        p = tuple(e["path"])
        if len(p) == 4 and p[0] == "layers" and p[2] == "qparams":
            where, field = legacy_qparams_key(p[3])
            new = (*p[:3], where, field)
            values[new] = values.pop(p)
            e = {**e, "path": list(new)}
            if e["type"] == LEGACY_QUANT_PARAM:
                e["type"] = type_name(Scale if field == "scale" else ZeroPoint)
        variables.append(e)
    return {**meta, "variables": variables}, values


def place(model, path: tuple, var, src: str) -> None:
    """Set `var` at `path`, creating nnx.Dict containers on the way (as calibration fills `qparams`)."""
    from flax import nnx

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
