"""Hadamard matrices of order n = m * 2^k and the fast transform x -> x @ H / sqrt(n).

Known orders m are built, not tabulated: Paley's first construction (q prime power, q = 3 mod 4,
order q+1) and second construction (q = 1 mod 4, order 2(q+1)) over GF(q), and Sylvester doubling.
That covers every m in KNOWN_ORDERS below (12, 20, 28, 36, 40, 52, 60, 108, 140, ...). Orders with no
such construction here (156 and 172 among the ones Llama shapes meet) fall back to a seeded random
orthogonal matrix, with a warning: still orthogonal, not +-1.
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings

import jax.numpy as jnp
import numpy as np


# ---------- GF(p^k) arithmetic (for Paley over prime powers such as 25 and 27) ----------
def _prime_power(q: int):
    for p in range(2, q + 1):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 else None
    return None


def _polymul_mod(a, b, mod, p):
    """Product of coefficient tuples a, b (low degree first) modulo monic `mod`, over GF(p)."""
    k = len(mod) - 1
    res = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            res[i + j] = (res[i + j] + x * y) % p
    for d in range(len(res) - 1, k - 1, -1):  # reduce x^d with x^k = -(mod[0..k-1])
        c = res[d]
        if c:
            res[d] = 0
            for i in range(k):
                res[d - k + i] = (res[d - k + i] - c * mod[i]) % p
    return tuple(res[:k])


def _field(q: int):
    """Elements of GF(q) as tuples, and a multiply function."""
    p, k = _prime_power(q)
    if k == 1:
        return [(i,) for i in range(p)], (lambda a, b: ((a[0] * b[0]) % p,)), p
    for tail in itertools.product(range(p), repeat=k):  # first monic polynomial with no factor
        mod = tuple(tail) + (1,)
        elems = list(itertools.product(range(p), repeat=k))
        mul = functools.partial(lambda a, b, m: _polymul_mod(a, b, m, p), m=mod)
        nonzero = [e for e in elems if any(e)]
        if all(any(mul(a, b) == (1,) + (0,) * (k - 1) for b in nonzero) for a in nonzero):
            return elems, mul, p
    raise AssertionError("no irreducible polynomial found")


def _quadratic_character(q: int) -> np.ndarray:
    """chi[i, j] = chi(e_i - e_j) over GF(q): 0 on the diagonal, +1 for squares, -1 otherwise."""
    elems, mul, p = _field(q)
    squares = {mul(e, e) for e in elems if any(e)}
    n = len(elems)
    chi = np.zeros((n, n), dtype=np.int64)
    for i, a in enumerate(elems):
        for j, b in enumerate(elems):
            d = tuple((x - y) % p for x, y in zip(a, b))
            if any(d):
                chi[i, j] = 1 if d in squares else -1
    return chi


def paley1(q: int) -> np.ndarray:
    """Order q+1 for a prime power q = 3 mod 4."""
    Q = _quadratic_character(q)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return S + np.eye(n, dtype=np.int64)


def paley2(q: int) -> np.ndarray:
    """Order 2(q+1) for a prime power q = 1 mod 4."""
    Q = _quadratic_character(q)
    n = q + 1
    C = np.zeros((n, n), dtype=np.int64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, Q
    blk_zero = np.array([[1, -1], [-1, -1]])
    blk_pm = np.array([[1, 1], [1, -1]])
    H = np.zeros((2 * n, 2 * n), dtype=np.int64)
    for i in range(n):
        for j in range(n):
            H[2 * i:2 * i + 2, 2 * j:2 * j + 2] = blk_zero if C[i, j] == 0 else C[i, j] * blk_pm
    return H


def _construct(m: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of order m by Paley or doubling, or None."""
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    if m == 2:
        return np.array([[1, 1], [1, -1]])
    if m % 4:
        return None
    pk = _prime_power(m - 1)
    if pk and (m - 1) % 4 == 3:
        return paley1(m - 1)
    if m % 2 == 0:
        q = m // 2 - 1
        pk = _prime_power(q) if q > 1 else None
        if pk and q % 4 == 1:
            return paley2(q)
        half = _construct(m // 2)
        if half is not None:
            return np.kron(np.array([[1, 1], [1, -1]]), half)
    return None


KNOWN_ORDERS = (12, 20, 28, 36, 40, 52, 60, 108, 140, 312, 344)  # 312 = 2*156, 344 = 2*172


MAX_CONSTRUCTED = 1024  # Paley over GF(q) costs O(q^2) Python work: keep the +-1 factor small


def split_pow2(n: int) -> tuple[int, int]:
    """n = m * p with p a power of two and m the smallest factor with a constructed Hadamard matrix.

    576 -> (36, 16), 1536 -> (12, 128), 11008 -> (344, 32), 14336 -> (28, 512), 4096 -> (1, 4096).
    When no m <= MAX_CONSTRUCTED works, m is the odd part of n (a random orthogonal block).
    """
    top = n & (-n)
    p = top
    while p >= 1:
        m = n // p
        if m <= MAX_CONSTRUCTED and _construct_cached(m) is not None:
            return m, p
        p //= 2
    return n // top, top


@functools.lru_cache(maxsize=None)
def _construct_cached(m: int):
    H = _construct(m)
    if H is not None:
        assert np.array_equal(H @ H.T, m * np.eye(m, dtype=np.int64)), f"construction of order {m} is not Hadamard"
    return H


@functools.lru_cache(maxsize=None)
def small_factor(m: int, seed: int = 0) -> np.ndarray:
    """Orthonormal m x m block: H_m / sqrt(m) when constructed, else a seeded random orthogonal (warning)."""
    H = _construct_cached(m)
    if H is not None:
        return (H / np.sqrt(m)).astype(np.float64)
    warnings.warn(f"no Hadamard matrix of order {m} is known here; using a seeded random orthogonal matrix instead")
    return random_orthogonal(m, seed)


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))[None, :]


def sylvester(n: int) -> np.ndarray:
    H = np.ones((1, 1))
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


def hadamard_matrix(n: int) -> np.ndarray:
    """Dense orthonormal H [n, n] = (H_m / sqrt(m)) kron (H_{2^k} / sqrt(2^k)), float64."""
    m, p = split_pow2(n)
    return np.kron(small_factor(m), sylvester(p) / np.sqrt(p))


@functools.lru_cache(maxsize=None)
def hadamard_kron_factors(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(P1, P2) float64 with kron(P1, P2) == hadamard_matrix(n), P2 a Sylvester block of size ~sqrt(n):
    the Kronecker pair pallas_kernels.rotate_quant applies as two small matmuls. Cached: do not modify."""
    m, p = split_pow2(n)
    p2 = 1
    while p2 < min(p, max(32, math.isqrt(n - 1) + 1)):  # next power of two >= sqrt(n), at least 32, at most p
        p2 *= 2
    p1 = p // p2
    return np.kron(small_factor(m), sylvester(p1) / np.sqrt(p1)), sylvester(p2) / np.sqrt(p2)


def fwht(x):
    """x @ H_{2^k} (unnormalized Sylvester) along the last axis, log2(n) butterfly stages."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return x


def hadamard_transform(x, n: int | None = None):
    """x @ hadamard_matrix(n) along the last axis without forming the n x n matrix.

    The last axis is viewed as [m, 2^k]: FWHT on 2^k, then a small m x m matmul; fp32 inside.
    """
    n = x.shape[-1] if n is None else n
    m, p = split_pow2(n)
    dtype = x.dtype
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], m, p)
    xf = fwht(xf) / np.sqrt(p)
    if m > 1:
        xf = jnp.einsum("...ip,ij->...jp", xf, jnp.asarray(small_factor(m), jnp.float32))
    return xf.reshape(x.shape).astype(dtype)


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """diag(random signs) @ H: orthogonal, seeded; the R1/R2 matrices."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return signs[:, None] * hadamard_matrix(n)
