"""Hadamard matrices are orthogonal (+-1 where constructed) and the fast transform equals the dense matmul."""
import jax.numpy as jnp
import numpy as np
import pytest

from prefixquant_jax.rotate import hadamard as H


@pytest.mark.parametrize("m", H.KNOWN_ORDERS)
def test_constructed_orders_are_hadamard(m):
    A = H._construct_cached(m)
    assert A is not None and set(np.unique(A)) == {-1, 1}
    np.testing.assert_array_equal(A @ A.T, m * np.eye(m, dtype=np.int64))


def dense_columns(n, cols):
    """Columns `cols` of the dense kron(H_m/sqrt(m), H_p/sqrt(p)), built independently of the fast path."""
    m, p = H.split_pow2(n)
    S, Hp = H.small_factor(m), H.sylvester(p) / np.sqrt(p)
    return np.stack([np.kron(S[:, c // p], Hp[:, c % p]) for c in cols], axis=1)


@pytest.mark.parametrize("n,m", [(64, 1), (576, 36), (1536, 12), (4096, 1), (11008, 344), (14336, 28)])
def test_fwht_equals_dense(n, m):
    assert H.split_pow2(n)[0] == m
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    fast = np.asarray(H.hadamard_transform(jnp.asarray(x)))
    tol = 2e-4 * np.sqrt(np.log2(n))
    if n < 4096:  # the whole dense matrix: orthogonal, and the fast transform equals x @ D
        D = H.hadamard_matrix(n)
        np.testing.assert_allclose(D @ D.T, np.eye(n), atol=1e-9)
        np.testing.assert_allclose(fast, x.astype(np.float64) @ D, atol=tol)
    else:  # 11008^2 / 14336^2 float64 is over 1 GB, and D D^T of 4096 takes seconds: check 96 sampled columns
        cols = np.random.default_rng(0).choice(n, 96, replace=False)
        Dc = dense_columns(n, cols)
        np.testing.assert_allclose(Dc.T @ Dc, np.eye(96), atol=1e-9)
        np.testing.assert_allclose(fast[:, cols], x.astype(np.float64) @ Dc, atol=tol)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), np.linalg.norm(x, axis=1), rtol=1e-4)


def test_random_fallback_warns_and_is_orthogonal():
    with pytest.warns(UserWarning, match="random orthogonal"):
        Q = H.small_factor(43, seed=5)
    np.testing.assert_allclose(Q @ Q.T, np.eye(43), atol=1e-10)


def test_random_hadamard_seeded():
    a, b, c = H.random_hadamard(576, 1), H.random_hadamard(576, 1), H.random_hadamard(576, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(a @ a.T, np.eye(576), atol=1e-9)


@pytest.mark.parametrize("K", [64, 576, 1536, 2048, 40])
def test_hadamard_kron_factors(K):
    """The Kronecker pair given to pallas_kernels.rotate_quant is the dense Hadamard matrix."""
    P1, P2 = H.hadamard_kron_factors(K)
    np.testing.assert_allclose(np.kron(P1, P2), H.hadamard_matrix(K), atol=1e-12)
