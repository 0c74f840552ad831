"""FlatQuant's learnable affine transforms: Kronecker factors, their two parameterizations, init, checks.

Per decoder layer, stored as variables in `block.transforms` (an nnx.Dict):

  transform  size             where it acts (online)                              absorbed into (offline)
  qkv        D = n1*n2        x_norm -> (x * s) (P1 kron P2) before q/k/v         s: input RMSNorm; P^-1: q, k, v kernels
  ug         D                before gate/up                                      s: post RMSNorm;  P^-1: gate, up kernels
  down       F = n1*n2        before down_proj                                    s: up kernel columns; P^-1: down kernel
  o          H (heads)        head mixing of the attention output                 (P_o kron P_v)^-1: o kernel
  k          head_dim         k -> k P_k after RoPE (q -> q P_k^-T)               online only (RoPE sits in between)
  v          head_dim         v -> v P_v per KV head                              P_v: v kernel columns; P_v^-1: o kernel

Keys: `<t>_1`, `<t>_2` (Kronecker factors; o/k/v have only `_1`), `<t>_s` (per-channel scale, qkv/ug/down),
`lwc_<linear>_max|min` ([1, out] sigmoid logits), `lac_<site>_max|min` ([1] sigmoid logits). With the
orthogonal parameterization a factor `<f>` is U diag(sigma) V^T with U = U0 cayley(A_u), V = cayley(A_v):
keys `<f>_base` (U0, frozen), `<f>_u`, `<f>_v` (A, skew part used), `<f>_sigma`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.errors import UserError


class TransformParam(nnx.Variable):
    """A learnable FlatQuant transform entry (Kronecker factor, per-channel scale, clip logit)."""


class ClipParam(TransformParam):
    """LWC / LAC clip logits: a TransformParam (selected with the transforms) with its own learning rate."""


class TransformBase(nnx.Variable):
    """Frozen part of a transform (the orthogonal parameterization's initial rotation U0): never trained."""


PARAMS = ("inverse", "orthogonal")
KRON = ("qkv", "ug", "down")  # two-factor transforms with a per-channel scale
SITE_OF = {"qkv": "qkv_in", "ug": "up_gate_in", "down": "down_in", "o": "o_in", "k": "k_cache", "v": "v_cache"}
CLIP_INIT = 4.0  # sigmoid(4) = 0.982
COND_MAX = 1e5  # condition number above which an fp32 inverse is not trusted


def kron_sizes(n: int) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 = n, n1 <= n2 and n1 the largest divisor of n not above sqrt(n)."""
    if n < 1:
        raise ValueError(f"kron_sizes: n must be positive, got {n}")
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def kron_apply(x, a, b):
    """x @ (a kron b) along the last axis, as two small matmuls on x viewed as [..., n1, n2] (fp32 inside)."""
    n1, n2 = a.shape[0], b.shape[0]
    dtype = x.dtype
    xr = x.astype(jnp.float32).reshape(*x.shape[:-1], n1, n2)
    y = jnp.einsum("...ij,jl->...il", xr, b.astype(jnp.float32))
    y = jnp.einsum("ik,...il->...kl", a.astype(jnp.float32), y)
    return y.reshape(x.shape).astype(dtype)


def kron_left(a, b, kernel):
    """(a kron b) @ kernel for kernel [n1*n2, out], without forming the Kronecker product."""
    n1, n2 = a.shape[0], b.shape[0]
    kr = kernel.astype(jnp.float32).reshape(n1, n2, kernel.shape[-1])
    return jnp.einsum("ik,jl,klo->ijo", a, b, kr).reshape(kernel.shape)


def cayley(w):
    """Orthogonal (I - A)^-1 (I + A) of the skew-symmetric A = w - w^T (identity at w = 0)."""
    a = w - w.T
    eye = jnp.eye(w.shape[0], dtype=w.dtype)
    return jnp.linalg.solve(eye - a, eye + a)


def factor(t, key: str, param: str):
    """(P, P^-1) in fp32 of factor `key` of the transforms dict `t`."""
    if param == "inverse":
        p = t[key][...].astype(jnp.float32)
        return p, jnp.linalg.inv(p)
    u = t[key + "_base"][...] @ cayley(t[key + "_u"][...])
    v = cayley(t[key + "_v"][...])
    s = t[key + "_sigma"][...]
    return (u * s[None, :]) @ v.T, (v / s[None, :]) @ u.T


def factors(t, name: str, param: str):
    """[(P, P^-1)] of every Kronecker factor of transform `name` (o, k, v: a single factor)."""
    return [factor(t, f"{name}_{i}", param) for i in (1, 2) if f"{name}_{i}" in t or f"{name}_{i}_base" in t]


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))[None, :]).astype(np.float32)


def _add_factor(t, key: str, n: int, param: str, rng) -> None:
    q = random_orthogonal(n, rng)
    if param == "inverse":
        t[key] = TransformParam(jnp.asarray(q))
    else:
        t[key + "_base"] = TransformBase(jnp.asarray(q))
        t[key + "_u"] = TransformParam(jnp.zeros((n, n), jnp.float32))
        t[key + "_v"] = TransformParam(jnp.zeros((n, n), jnp.float32))
        t[key + "_sigma"] = TransformParam(jnp.ones((n,), jnp.float32))


def smooth_scale(w_absmax, x_absmax, alpha: float):
    """SmoothQuant-style per-channel scale s = w^(1-alpha) / x^alpha, floored at 1e-5 (x is multiplied by s)."""
    w = np.maximum(np.asarray(w_absmax, np.float64), 1e-5)
    x = np.maximum(np.asarray(x_absmax, np.float64), 1e-5)
    return np.maximum(w ** (1 - alpha) / x ** alpha, 1e-5).astype(np.float32)


def init_block(block, config, seed, param: str = "inverse", act_absmax: dict | None = None, alpha: float = 0.3,
               lwc: bool = True, lac_sites=()) -> None:
    """Fill `block.transforms`: random orthogonal factors (seeded), SmoothQuant-style scales from the
    calibration activation maxima `act_absmax` {site: [n]} (ones without them), LWC logits for every linear
    (when `lwc`) and LAC logits for `lac_sites`."""
    if param not in PARAMS:
        raise UserError(f"unknown FlatQuant parameterization {param!r} (one of {', '.join(PARAMS)})")
    rng = np.random.default_rng(seed)
    t = block.transforms
    D, F, H, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
    for name, n in (("qkv", D), ("ug", D), ("down", F)):
        for i, m in enumerate(kron_sizes(n), start=1):
            _add_factor(t, f"{name}_{i}", m, param, rng)
    for name, n in (("o", H), ("k", hd), ("v", hd)):
        _add_factor(t, f"{name}_1", n, param, rng)
    a, m = block.attn, block.mlp
    w_max = {"qkv": jnp.concatenate([a.q.kernel[...], a.k.kernel[...], a.v.kernel[...]], axis=1),
             "ug": jnp.concatenate([m.gate.kernel[...], m.up.kernel[...]], axis=1), "down": m.down.kernel[...]}
    for name in KRON:
        x = (act_absmax or {}).get(SITE_OF[name])
        w = np.abs(np.asarray(w_max[name], np.float32)).max(axis=1)
        s = np.ones_like(w) if x is None else smooth_scale(w, x, alpha)
        t[f"{name}_s"] = TransformParam(jnp.asarray(s))
    if lwc:
        for lin, mod in (("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o), ("gate", m.gate), ("up", m.up), ("down", m.down)):
            out = mod.kernel.shape[1]
            for side in ("max", "min"):
                t[f"lwc_{lin}_{side}"] = ClipParam(jnp.full((1, out), CLIP_INIT, jnp.float32))
    for site in lac_sites:
        for side in ("max", "min"):
            t[f"lac_{site}_{side}"] = ClipParam(jnp.full((1,), CLIP_INIT, jnp.float32))


def transform_names(t) -> list[str]:
    return [n for n in ("qkv", "ug", "down", "o", "k", "v") if f"{n}_1" in t or f"{n}_1_base" in t]


def condition_number(t, name: str, param: str) -> float:
    """cond(P) of transform `name` = product of its factors' condition numbers (2-norm, fp64)."""
    c = 1.0
    for p, _ in factors(t, name, param):
        sv = np.linalg.svd(np.asarray(p, np.float64), compute_uv=False)
        c *= float(sv[0] / sv[-1]) if sv[-1] > 0 and np.isfinite(sv).all() else float("inf")
    return c


def check_transforms(model, param: str, cond_max: float = COND_MAX) -> dict:
    """Condition number of every transform of every layer; UserError (one line) at the first one that is
    singular or above `cond_max`. Returns {layer: {site: cond}}."""
    out = {}
    for i, blk in enumerate(model.layers):
        t = blk.transforms
        out[i] = {}
        for name in transform_names(t):
            c = condition_number(t, name, param)
            if not c <= cond_max:
                what = "singular" if not np.isfinite(c) else f"ill-conditioned (condition number {c:.3g} > {cond_max:g})"
                raise UserError(f"FlatQuant transform of layer {i} at site {SITE_OF[name]} is {what}; its inverse is not "
                                f"reliable in fp32 (retrain with a lower FlatOptions.lr or FlatOptions.param 'orthogonal')",
                                "FlatOptions.lr", "FlatOptions.param")
            out[i][SITE_OF[name]] = c
        if "qkv_s" in t:
            for name in KRON:
                s = np.asarray(t[f"{name}_s"][...])
                if not (np.isfinite(s).all() and (np.abs(s) > 0).all()):
                    raise UserError(f"FlatQuant per-channel scale of layer {i} at site {SITE_OF[name]} has a zero or "
                                    f"non-finite entry; it cannot be inverted")
    return out


def positive_scales(state):
    """Trainer projection: keep the per-channel scales (`*_s`) and orthogonal sigmas >= 1e-5."""
    def f(path, x):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        return jnp.maximum(x, 1e-5) if any(n.endswith(("_s", "_sigma")) for n in names) else x
    return jax.tree_util.tree_map_with_path(f, state)
