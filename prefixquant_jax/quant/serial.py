"""Recipes as JSON: a frozen dataclass tree (QuantRecipe, FlatQuantRecipe, QuantSpec) tagged by class, for the saved
format's metadata and training runs' fingerprints.

- `type_name(cls)` / `resolve(name)`: a class as "module:qualname" ("flax.nnx:Param" for NNX's own variable
  types); only flax.nnx and prefixquant_jax classes are ever imported back.
- `encode(obj)` / `decode(obj)`: {"__class__": name, field: value}, tuples as lists (decoded back to tuples so
  a recipe stays hashable).
"""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np

from prefixquant_jax.errors import UserError, describe


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
        raise UserError(f"{source}: unknown class {name!r} (saved by another version?)") from None
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


def decode(obj, source: str):
    """Inverse of `encode`; lists come back as tuples (recipes are hashable)."""
    if isinstance(obj, dict) and "__class__" in obj:
        cls = resolve(obj["__class__"], source)
        try:
            return cls(**{k: decode(v, source) for k, v in obj.items() if k != "__class__"})
        except (TypeError, UserError) as e:
            raise UserError(f"{source}: cannot rebuild {obj['__class__']} ({describe(e)})") from None
    if isinstance(obj, list):
        return tuple(decode(x, source) for x in obj)
    return obj
