"""FlatQuant transforms: Kronecker sizes and matmuls, both parameterizations' inverses, the conditioning check."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefixquant_jax.errors import UserError
from prefixquant_jax.flatquant.transforms import (Factor, FactorBase, SingularValues, check_transforms, factor,
                                                  kron_apply, kron_left, kron_sizes)


@pytest.mark.parametrize("n,sizes", [(576, (24, 24)), (1536, (32, 48)), (4096, (64, 64)), (11008, (86, 128)),
                                     (14336, (112, 128)), (64, (8, 8)), (96, (8, 12)), (7, (1, 7))])
def test_kron_sizes(n, sizes):
    assert kron_sizes(n) == sizes


def test_kron_matmul_equals_dense():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 8)), rng.standard_normal((12, 12))
    x = rng.standard_normal((2, 3, 96))
    dense = np.kron(a, b)
    y = kron_apply(jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), x @ dense, rtol=1e-4, atol=1e-4)
    w = rng.standard_normal((96, 5))
    np.testing.assert_allclose(np.asarray(kron_left(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                                    jnp.asarray(w, jnp.float32))), dense @ w, rtol=1e-4, atol=1e-4)


def _factor(param, n, rng):
    """A factor as block.transforms holds it: a Factor (inverse) or nnx.Dict(base, u, v, sigma) (orthogonal)."""
    if param == "inverse":  # a trained, non-orthogonal matrix
        return Factor(jnp.asarray(np.eye(n) + 0.3 * rng.standard_normal((n, n)), jnp.float32))
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return nnx.Dict(base=FactorBase(jnp.asarray(q, jnp.float32)),
                    u=Factor(jnp.asarray(0.3 * rng.standard_normal((n, n)), jnp.float32)),
                    v=Factor(jnp.asarray(0.3 * rng.standard_normal((n, n)), jnp.float32)),
                    sigma=SingularValues(jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)))


@pytest.mark.parametrize("param", ["inverse", "orthogonal"])
def test_inverse_within_fp32(param):
    f = _factor(param, 24, np.random.default_rng(1))
    p, pinv = (np.asarray(a, np.float64) for a in factor(f, param))
    np.testing.assert_allclose(p @ pinv, np.eye(24), atol=2e-5)
    np.testing.assert_allclose(pinv @ p, np.eye(24), atol=2e-5)
    if param == "orthogonal":  # U diag(s) V^T: singular values are the sigmas
        sv = np.linalg.svd(p, compute_uv=False)
        np.testing.assert_allclose(np.sort(sv), np.sort(np.asarray(f["sigma"][...])), rtol=1e-4)


def test_q_k_invariance():
    rng = np.random.default_rng(2)
    p = np.eye(16) + 0.3 * rng.standard_normal((16, 16))
    q, k = rng.standard_normal((5, 16)), rng.standard_normal((7, 16))
    np.testing.assert_allclose((q @ np.linalg.inv(p).T) @ (k @ p).T, q @ k.T, atol=1e-9)


class _Blk(nnx.Module):
    def __init__(self, t):
        self.transforms = t


class _Model(nnx.Module):
    def __init__(self, blocks):
        self.layers = nnx.List(blocks)


@pytest.mark.parametrize("param", ["inverse", "orthogonal"])
def test_singular_transform_is_one_line_error(param):
    rng = np.random.default_rng(3)
    blocks = []
    for i in range(2):
        t = nnx.Dict()
        t["qkv_in"] = nnx.Dict(left=_factor(param, 8, rng), right=_factor(param, 8, rng))
        blocks.append(_Blk(t))
    assert set(check_transforms(_Model(blocks), param)[1]) == {"qkv_in"}
    right = blocks[1].transforms["qkv_in"]["right"]
    if param == "inverse":
        m = np.asarray(right[...]).copy()
        m[:, 3] = 2 * m[:, 5]  # rank-deficient
        right[...] = jnp.asarray(m)
    else:
        right["sigma"][...] = right["sigma"][...].at[4].set(0.0)
    with pytest.raises(UserError) as e:
        check_transforms(_Model(blocks), param)
    msg = str(e.value)
    assert "\n" not in msg and "layer 1" in msg and "qkv_in" in msg, msg
    assert "singular" in msg or "ill-conditioned" in msg


def test_inverse_gradient_equals_autodiff():
    """The closed-form vjp of `inverse` against JAX's differentiation of jnp.linalg.inv (float32; relative 1e-4)."""
    import jax

    from prefixquant_jax.flatquant.transforms import inverse
    rng = np.random.default_rng(3)
    p = jnp.asarray(np.eye(12) + 0.3 * rng.standard_normal((12, 12)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((12, 12)), jnp.float32)
    ours = jax.grad(lambda a: jnp.sum(jnp.sin(inverse(a)) * w))(p)
    ref = jax.grad(lambda a: jnp.sum(jnp.sin(jnp.linalg.inv(a)) * w))(p)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
