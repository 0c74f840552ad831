"""quant/int_linear.py: the runtime's integer product with the float product's gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefixquant_jax.quant.int_linear import exact_in_f32, int_linear


def _operands(a_bits, w_bits, K=96, N=40, seed=0):
    rng = np.random.default_rng(seed)
    qx = rng.integers(-2 ** (a_bits - 1), 2 ** (a_bits - 1), (2, 5, K)).astype(np.float32)
    qw = rng.integers(-2 ** (w_bits - 1), 2 ** (w_bits - 1), (K, N)).astype(np.float32)
    sx = rng.uniform(0.01, 0.1, (2, 5, 1)).astype(np.float32)
    sw = rng.uniform(0.01, 0.1, (1, N)).astype(np.float32)
    return qx, sx, qw, sw


@pytest.mark.parametrize("a_bits,w_bits,use_int32", [(4, 4, False), (8, 4, False), (8, 8, True), (4, 4, True)])
def test_forward_is_exact_integer_accumulation_then_scales(a_bits, w_bits, use_int32):
    qx, sx, qw, sw = _operands(a_bits, w_bits)
    y = int_linear(jnp.asarray(qx * sx), jnp.asarray(qw * sw), qx, sx, qw, sw, use_int32)
    acc = (qx.astype(np.int64) @ qw.astype(np.int64)).astype(np.float32)  # exact, then the runtime's epilogue order
    np.testing.assert_array_equal(np.asarray(y), acc * sx * sw)


def test_exact_in_f32_bound():
    assert exact_in_f32(4, 4, 262143) and not exact_in_f32(4, 4, 262144)
    assert exact_in_f32(8, 4, 14336) and not exact_in_f32(8, 8, 1536)


def test_gradients_are_those_of_the_float_product():
    qx, sx, qw, sw = _operands(4, 4, seed=1)
    x_dq, k_fq = jnp.asarray(qx * sx), jnp.asarray(qw * sw)
    g = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 40)), jnp.float32)
    f_int = lambda x, k: jnp.sum(int_linear(x, k, qx, sx, qw, sw, False) * g)
    f_flt = lambda x, k: jnp.sum((x @ k) * g)
    gi, gf = jax.grad(f_int, argnums=(0, 1))(x_dq, k_fq), jax.grad(f_flt, argnums=(0, 1))(x_dq, k_fq)
    for a, b in zip(gi, gf):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
