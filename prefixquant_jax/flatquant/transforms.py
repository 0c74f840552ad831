"""FlatQuant's learnable affine transforms: Kronecker factors, their two parameterizations, init, checks.

Per decoder layer, typed variables in `block.transforms`, keyed like `block.qparams` by where they act:

  transforms[site]   site         size            online                                 offline (merge.py)
  "left", "right",   qkv_in       D = n1*n2       x_norm -> (x * s) (P1 kron P2)         s: input RMSNorm; P^-1: q/k/v
  "smooth"           up_gate_in   D               before gate/up                         s: post RMSNorm;  P^-1: gate/up
                     down_in      F = n1*n2       before down_proj                       s: up columns;    P^-1: down
  "left"             o_in         H (heads)       head mixing of the attention output    (P_o kron P_v)^-1: o kernel
                     k_cache      head_dim        k -> k P_k after RoPE (q -> q P_k^-T)  online only (RoPE in between)
                     v_cache      head_dim        v -> v P_v per KV head                 P_v: v columns; P_v^-1: o kernel
  "clip_min",        a dynamic site: LAC, the per-token range shrunk by sigmoid(logit) ([1])
  "clip_max"
  transforms[linear] "clip_min", "clip_max": LWC of linear q k v o gate up down ([1, out] sigmoid logits)

A factor ("left" / "right") is a Factor P ("inverse" parameterization: P^-1 = inv(P)), or ("orthogonal") an
nnx.Dict U diag(sigma) V^T with U = base cayley(u), V = cayley(v): base (FactorBase, frozen), u, v (Factor, the
skew part used), sigma (SingularValues). The factors start random orthogonal (FlatQuant's init) or at the rotated
model's Hadamards (`init_block(start="hadamard")`: training starts where QuaRot / PrefixQuant stand).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.errors import UserError
from prefixquant_jax.rotate.hadamard import hadamard_kron_factors, hadamard_matrix


class TransformParam(nnx.Variable):
    """A learnable FlatQuant entry: the transforms' group of the trainer (ClipLogit has its own)."""


class Factor(TransformParam):
    """A Kronecker factor P, or a Cayley generator of the orthogonal parameterization."""


class SmoothScale(TransformParam):
    """The per-channel scale s of a Kronecker site (x * s), folded into a norm or the up kernel by the merge."""


class SingularValues(TransformParam):
    """sigma of an orthogonally parameterized factor U diag(sigma) V^T."""


class ClipLogit(TransformParam):
    """LWC / LAC sigmoid logits: selected with the transforms, trained at their own learning rate."""


class FactorBase(nnx.Variable):
    """Frozen part of a factor (the orthogonal parameterization's initial rotation U0): never trained."""


PARAMS = ("inverse", "orthogonal")
STARTS = ("random", "hadamard")  # init_block
KRON_SITES = ("qkv_in", "up_gate_in", "down_in")  # two-factor transforms with a per-channel scale
HEAD_SITES = ("o_in", "k_cache", "v_cache")  # one factor
CLIP_INIT = 4.0  # sigmoid(4) = 0.982
COND_MAX = 1e5  # condition number above which an fp32 inverse is not trusted
POSITIVE_MIN = 1e-5


def kron_sizes(n: int) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 = n, n1 <= n2 and n1 the largest divisor of n not above sqrt(n)."""
    if n < 1:
        raise ValueError(f"kron_sizes: n must be positive, got {n}")
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def kron_apply(x, a, b, shuffled: bool = False):
    """x @ (a kron b) along the last axis, as two small 2-D matmuls on x viewed as [..., n1, n2] (fp32 inside): the
    right factor on the rows of x, then the left one on the rows of its transpose (XLA's CPU backward of a 2-D
    matmul moves far less data than that of a contraction over a middle axis). `shuffled`: the channels left in
    the transposed (n2, n1) order, x @ (a kron b) @ S with S the perfect shuffle (one transpose less each way, for
    a kernel whose rows are shuffle_rows'd and a quantizer blind to the channel order)."""
    n1, n2 = a.shape[0], b.shape[0]
    dtype, lead = x.dtype, x.shape[:-1]
    z = (x.astype(jnp.float32).reshape(-1, n2) @ b.astype(jnp.float32)).reshape(-1, n1, n2)
    y = jnp.swapaxes(z, 1, 2).reshape(-1, n1) @ a.astype(jnp.float32)
    if shuffled:
        return y.reshape(*lead, n1 * n2).astype(dtype)
    return jnp.swapaxes(y.reshape(-1, n2, n1), 1, 2).reshape(*lead, n1 * n2).astype(dtype)


def shuffle_rows(kernel, n1: int, n2: int):
    """S^T kernel: the rows of kernel [n1*n2, out] in the (n2, n1) order of kron_apply(shuffled=True)."""
    return jnp.swapaxes(kernel.reshape(n1, n2, -1), 0, 1).reshape(kernel.shape)


def kron_left(a, b, kernel):
    """(a kron b) @ kernel for kernel [n1*n2, out], without forming the Kronecker product: b on the middle axis of
    kernel viewed as [n1, n2, out] (a batched matmul, b broadcast over n1), then a as one 2-D matmul."""
    n1, n2 = a.shape[0], b.shape[0]
    t = jnp.matmul(b.astype(jnp.float32), kernel.astype(jnp.float32).reshape(n1, n2, -1))
    return (a.astype(jnp.float32) @ t.reshape(n1, -1)).reshape(kernel.shape)


def cayley(w):
    """Orthogonal (I - A)^-1 (I + A) of the skew-symmetric A = w - w^T (identity at w = 0)."""
    a = w - w.T
    eye = jnp.eye(w.shape[0], dtype=w.dtype)
    return jnp.linalg.solve(eye - a, eye + a)


@jax.custom_vjp
def inverse(p):
    """jnp.linalg.inv with the closed-form gradient -P^-T G P^-T (two small matmuls instead of differentiating
    through the LU solves)."""
    return jnp.linalg.inv(p)


def _inverse_fwd(p):
    q = jnp.linalg.inv(p)
    return q, q


def _inverse_bwd(q, g):
    return (-(q.T @ g @ q.T),)


inverse.defvjp(_inverse_fwd, _inverse_bwd)


def factor(f, param: str):
    """(P, P^-1) in fp32 of the factor `f` (a Factor, or an orthogonal parameterization's nnx.Dict)."""
    if param == "inverse":
        p = f[...].astype(jnp.float32)
        return p, inverse(p)
    u = f["base"][...] @ cayley(f["u"][...])
    v = cayley(f["v"][...])
    s = f["sigma"][...]
    return (u * s[None, :]) @ v.T, (v / s[None, :]) @ u.T


def has_transform(t, site: str) -> bool:
    return site in t and "left" in t[site]


def factors(t, site: str, param: str):
    """[(P, P^-1)] of every factor of the transform at `site` ([] without one; o, k, v: a single factor)."""
    if site not in t:
        return []
    return [factor(t[site][side], param) for side in ("left", "right") if side in t[site]]


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))[None, :]).astype(np.float32)


def _new_factor(n: int, param: str, rng):
    return _start_factor(random_orthogonal(n, rng), param)


def smooth_scale(w_absmax, x_absmax, alpha: float):
    """SmoothQuant-style per-channel scale s = w^(1-alpha) / x^alpha, floored at 1e-5 (x is multiplied by s)."""
    w = np.maximum(np.asarray(w_absmax, np.float64), 1e-5)
    x = np.maximum(np.asarray(x_absmax, np.float64), 1e-5)
    return np.maximum(w ** (1 - alpha) / x ** alpha, 1e-5).astype(np.float32)


def _clip_pair(shape) -> nnx.Dict:
    return nnx.Dict(clip_max=ClipLogit(jnp.full(shape, CLIP_INIT, jnp.float32)),
                    clip_min=ClipLogit(jnp.full(shape, CLIP_INIT, jnp.float32)))


def _hadamard_start(config) -> dict:
    """{site: [factor matrices]} of the Hadamard start: the rotated model's matrices (rotate/fuse.py with
    hadamard_matrix for R1, R2, R4 and the online R3), as Kronecker pairs where the site has two factors
    (hadamard_kron_factors: kron(P1, P2) == hadamard_matrix(n)); o_in the identity (the rotated model does not
    mix heads at o's input)."""
    D, F, H, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
    out = {site: list(hadamard_kron_factors(n)) for site, n in (("qkv_in", D), ("up_gate_in", D), ("down_in", F))}
    out.update(o_in=[np.eye(H)], k_cache=[hadamard_matrix(hd)], v_cache=[hadamard_matrix(hd)])
    return out


def _start_factor(p: np.ndarray, param: str):
    """The factor P = p (orthogonal): p itself ("inverse"), or U0 = p with u = v = 0 and sigma = 1."""
    p = jnp.asarray(p, jnp.float32)
    if param == "inverse":
        return Factor(p)
    n = p.shape[0]
    return nnx.Dict(base=FactorBase(p), u=Factor(jnp.zeros((n, n), jnp.float32)),
                    v=Factor(jnp.zeros((n, n), jnp.float32)), sigma=SingularValues(jnp.ones((n,), jnp.float32)))


def init_block(block, config, seed, param: str = "inverse", act_absmax: dict | None = None, alpha: float = 0.3,
               lwc: bool = True, lac_sites=(), start: str = "random") -> None:
    """Fill `block.transforms` (module docstring): factors, per-channel scales, LWC logits for every linear (when
    `lwc`) and LAC logits for `lac_sites`. `start` "random": random orthogonal factors (seeded) and SmoothQuant-style
    scales from the calibration activation maxima `act_absmax` {site: [n]} (ones without them); "hadamard": the
    rotated model's Hadamards (_hadamard_start) and the scales 1 / |norm weight| at q/k/v and gate/up, 1 at down:
    x * s is the unweighted RMSNorm the rotated model quantizes (it folds the norm weights into the kernels), so
    with positive norm weights the quantizers see what the rotated model's do."""
    if param not in PARAMS:
        raise UserError(f"unknown FlatQuant parameterization {param!r} (one of {', '.join(PARAMS)})")
    if start not in STARTS:
        raise UserError(f"unknown FlatQuant start {start!r} (one of {', '.join(STARTS)})", "FlatOptions.start")
    t = block.transforms
    a, m = block.attn, block.mlp
    if start == "hadamard":
        for site, mats in _hadamard_start(config).items():
            t[site] = nnx.Dict(left=_start_factor(mats[0], param))
            if len(mats) == 2:
                t[site]["right"] = _start_factor(mats[1], param)
        norm = {"qkv_in": block.input_norm.weight[...], "up_gate_in": block.post_norm.weight[...]}
        for site in KRON_SITES:
            w = np.abs(np.asarray(norm[site], np.float32)) if site in norm else np.ones(config.intermediate_size, np.float32)
            t[site]["smooth"] = SmoothScale(jnp.asarray(1.0 / np.maximum(w, POSITIVE_MIN)))
    else:
        rng = np.random.default_rng(seed)
        D, F, H, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
        for site, n in (("qkv_in", D), ("up_gate_in", D), ("down_in", F)):  # the order draws the seeded factors
            n1, n2 = kron_sizes(n)
            t[site] = nnx.Dict(left=_new_factor(n1, param, rng))
            t[site]["right"] = _new_factor(n2, param, rng)
        for site, n in (("o_in", H), ("k_cache", hd), ("v_cache", hd)):
            t[site] = nnx.Dict(left=_new_factor(n, param, rng))
        w_max = {"qkv_in": jnp.concatenate([a.q.kernel[...], a.k.kernel[...], a.v.kernel[...]], axis=1),
                 "up_gate_in": jnp.concatenate([m.gate.kernel[...], m.up.kernel[...]], axis=1),
                 "down_in": m.down.kernel[...]}
        for site in KRON_SITES:
            x = (act_absmax or {}).get(site)
            w = np.abs(np.asarray(w_max[site], np.float32)).max(axis=1)
            s = np.ones_like(w) if x is None else smooth_scale(w, x, alpha)
            t[site]["smooth"] = SmoothScale(jnp.asarray(s))
    if lwc:
        for lin, mod in (("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o), ("gate", m.gate), ("up", m.up),
                         ("down", m.down)):
            t[lin] = _clip_pair((1, mod.kernel.shape[1]))
    for site in lac_sites:
        pair = _clip_pair((1,))
        t[site]["clip_max"], t[site]["clip_min"] = pair["clip_max"], pair["clip_min"]


def condition_number(t, site: str, param: str) -> float:
    """cond(P) of the transform at `site` = product of its factors' condition numbers (2-norm, fp64)."""
    c = 1.0
    for p, _ in factors(t, site, param):
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
        for site in KRON_SITES + HEAD_SITES:
            if not has_transform(t, site):
                continue
            c = condition_number(t, site, param)
            if not c <= cond_max:
                what = "singular" if not np.isfinite(c) else f"ill-conditioned (condition number {c:.3g} > {cond_max:g})"
                raise UserError(f"FlatQuant transform of layer {i} at site {site} is {what}; its inverse is not "
                                f"reliable in fp32 (retrain with a lower FlatOptions.lr or FlatOptions.param 'orthogonal')",
                                "FlatOptions.lr", "FlatOptions.param")
            out[i][site] = c
        for site in KRON_SITES:
            if site in t and "smooth" in t[site]:
                s = np.asarray(t[site]["smooth"][...])
                if not (np.isfinite(s).all() and (np.abs(s) > 0).all()):
                    raise UserError(f"FlatQuant per-channel scale of layer {i} at site {site} has a zero or "
                                    f"non-finite entry; it cannot be inverted")
    return out


def positive_scales(state):
    """Trainer projection: keep the per-channel scales and the orthogonal sigmas >= POSITIVE_MIN."""
    def f(v):
        if isinstance(v, (SmoothScale, SingularValues)):
            return v.replace(jnp.maximum(v[...], POSITIVE_MIN))
        return v
    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
