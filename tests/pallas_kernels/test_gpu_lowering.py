"""Every kernel lowers for CUDA through Pallas' Triton backend, checked on the CPU.

jax can lower (not compile or run) a function for a platform it does not have: `.trace(...).lower(
lowering_platforms=("cuda",))` runs the Pallas -> Triton lowering in Python and emits one
`__gpu$xla.gpu.triton` custom call per kernel. That catches, without a GPU, what interpret mode cannot:
primitives the Triton lowering lacks (it has no rule for `lax.slice` or `lax.round`, say), and a call
that falls through to Mosaic GPU (jax >= 0.10's default without Triton compiler_params, which stages
whole blocks in shared memory: a 128-row GEMM tile with its full K = 4096 needs 559 KB). Triton's own
compilation (registers, shared memory) is checked offline in test_sm90_compile.py; speed needs a GPU.
The shapes are the GPU benchmark shapes (Llama-3-8B) and odd SmolLM2-sized ones.
"""
import warnings

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import decode_attention, gemv_w4, rotate_quant, w4a4_matmul, w4a8_matmul
from pallas_kernels.sm90_check import triton_ir
from prefixquant_jax.rotate.hadamard import hadamard_kron_factors

S = jax.ShapeDtypeStruct
F32, I8, BF16 = jnp.float32, jnp.int8, jnp.bfloat16


def cuda_kernels(fn, *args) -> list[str]:
    """Sorted names of the Triton kernels in fn(*args) lowered for CUDA (fn must call the kernels with
    interpret=False; args may be ShapeDtypeStructs). Raises if anything lowers through Mosaic GPU."""
    return sorted(name for name, *_ in triton_ir(fn, *args))


GEMM_SHAPES = [(2048, 4096, 4096), (2048, 4096, 14336), (2048, 14336, 4096), (16, 4096, 4096), (37, 576, 960),
               (5, 1536, 576)]


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "per-tensor"])
def test_w4a4_w4a8_lower_to_triton(M, K, N, static):
    xs = S((1, 1) if static else (M, 1), F32)
    w, ws = S((K // 2, N), I8), S((1, N), F32)
    assert cuda_kernels(lambda x, xs, w, ws: w4a4_matmul(x, xs, w, ws, interpret=False),
                        S((M, K // 2), I8), xs, w, ws) == ["w4a4_matmul"]
    assert cuda_kernels(lambda x, xs, w, ws: w4a8_matmul(x, xs, w, ws, interpret=False),
                        S((M, K), I8), xs, w, ws) == ["w4a8_matmul"]


@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, None), (4096, 14336, 128), (1536, 576, 64)])
def test_gemv_lowers_to_triton(M, K, N, group):
    scale = S((1, N) if group is None else (K // group, N), F32)
    assert cuda_kernels(lambda x, w, s: gemv_w4(x, w, s, interpret=False),
                        S((M, K), BF16), S((K // 2, N), I8), scale) == ["gemv_w4"]


@pytest.mark.parametrize("M,K", [(2048, 4096), (2048, 14336), (7, 576), (7, 1536), (1, 64)])
@pytest.mark.parametrize("mode", ["dynamic", "static-int8", "lac", "kronecker"])
def test_rotate_quant_lowers_to_triton(M, K, mode):
    kw = {"dynamic": {}, "static-int8": {"scale": jnp.float32(0.1), "bits": 8},
          "lac": {"lac": (jnp.float32(0.9), jnp.float32(0.8))}}.get(mode, {})
    rotation = (jnp.eye(K // 32), jnp.eye(32)) if mode == "kronecker" else hadamard_kron_factors(K)
    assert cuda_kernels(lambda x: rotate_quant(x, rotation, interpret=False, **kw), S((M, K), BF16)) == ["rotate_quant"]


@pytest.mark.parametrize("B,H,KV,hd,T,P", [(1, 32, 8, 128, 2048, 4), (4, 32, 8, 128, 2048, 0), (1, 9, 3, 64, 300, 8),
                                          (2, 9, 3, 64, 17, 1)])
def test_decode_attention_lowers_to_triton(B, H, KV, hd, T, P):
    per_head = S((KV,), F32)
    args = [S((B, H, hd), BF16), S((B, T, KV, hd // 2), I8), S((B, T, KV, hd // 2), I8), S((B,), jnp.int32)]
    args += [per_head] * 4 + ([S((P, KV, hd), BF16)] * 2 if P else [])
    assert cuda_kernels(lambda *a: decode_attention(*a, interpret=False), *args) == ["decode_attention"]


def test_without_triton_params_pallas_would_pick_mosaic():
    """The reason every kernel passes triton_params(): the same call without it goes to Mosaic GPU here
    (if this jax's default changes back to Triton, the test says so rather than passing silently)."""
    from jax.experimental import pallas as pl

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    def f(x):
        return pl.pallas_call(copy, out_shape=S((16, 16), F32))(x)

    try:
        with warnings.catch_warnings():  # Mosaic's deprecation of pl.pallas_call: expected here
            warnings.simplefilter("ignore", DeprecationWarning)
            txt = jax.jit(f).trace(S((16, 16), F32)).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # noqa: BLE001 - Mosaic's own lowering may refuse on a CPU-only jaxlib
        pytest.skip(f"Mosaic GPU lowering unavailable here: {type(e).__name__}")
    assert "mosaic" in txt.lower()
