"""Packed int4 layout, shared helpers (rounding, nibble unpack) against independent numpy code."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import (
    pack_lo_hi,
    resolve_interpret,
    round_half_even,
    unpack_lo_hi,
    unpack_lo_hi_unsigned,
)
from pallas_kernels.int4 import pack_int4, unpack_int4


def np_pack(q, axis):
    """Independent packer: byte = low nibble of q[2j] | low nibble of q[2j+1] << 4, as a signed byte."""
    q = np.moveaxis(np.asarray(q, np.int64), axis, -1)
    b = (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)
    return np.moveaxis(((b + 128) % 256 - 128).astype(np.int8), -1, axis)


@pytest.mark.parametrize("shape,axis", [((6, 5), 0), ((3, 8), -1), ((2, 4, 3), 1), ((1, 2), 1)])
def test_pack_unpack_roundtrip(shape, axis):
    q = np.random.default_rng(0).integers(-8, 8, shape)
    p = pack_int4(q, axis=axis)
    assert p.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(p), np_pack(q, axis))
    np.testing.assert_array_equal(np.asarray(unpack_int4(p, axis=axis)), q)


def test_pack_rejects_odd_axis():
    with pytest.raises(ValueError):
        pack_int4(np.zeros((3, 4), np.int8), axis=0)


def test_uint4_codes_wrap_to_the_same_bytes():
    """KV codes in [0, 15] go through pack_int4 unchanged bitwise; & 0xF recovers them."""
    c = np.random.default_rng(1).integers(0, 16, (4, 10))
    p = pack_int4(c, axis=-1)
    np.testing.assert_array_equal(np.asarray(p), np_pack(c, -1))
    np.testing.assert_array_equal(np.asarray(unpack_int4(p) & 0xF), c)
    lo, hi = unpack_lo_hi_unsigned(p)
    np.testing.assert_array_equal(np.asarray(lo), c[:, 0::2])
    np.testing.assert_array_equal(np.asarray(hi), c[:, 1::2])


def test_lo_hi_helpers_match_layout():
    q = np.random.default_rng(2).integers(-8, 8, (5, 12))
    p = pack_int4(q, axis=-1)
    lo, hi = unpack_lo_hi(p)
    np.testing.assert_array_equal(np.asarray(lo), q[:, 0::2])
    np.testing.assert_array_equal(np.asarray(hi), q[:, 1::2])
    np.testing.assert_array_equal(np.asarray(pack_lo_hi(lo, hi)), np.asarray(p))


def test_round_half_even_matches_jnp_round_bitwise():
    ties = np.arange(-10, 10) + 0.5
    near = np.concatenate([np.nextafter(ties, 100), np.nextafter(ties, -100)])
    rnd = np.random.default_rng(3).uniform(-200, 200, 1000)
    y = np.concatenate([ties, near, rnd, [0.0, -0.0, 0.49999997, -0.49999997, 2.5, -2.5]]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(round_half_even(jnp.asarray(y))), np.round(y))


def test_interpret_default_on_cpu():
    assert resolve_interpret(None) is True
    assert resolve_interpret(False) is False
