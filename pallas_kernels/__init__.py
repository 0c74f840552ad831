"""Pallas kernels for 4-bit inference: W4A4 / W4A8 GEMM, W4 GEMV, fused rotate+quantize, int4-KV decode attention.

Two GPU backends: Pallas Triton (every kernel) and Pallas Mosaic GPU (the GEMMs and the GEMV, `*_mgpu`:
TMA, warp-specialized pipelines, wgmma on Hopper; gemm_mgpu.py, gemv_mgpu.py), with the same packed
layout and the same jnp references. Off the GPU the Triton kernels run in Pallas interpret mode and the
Mosaic ones in GPU interpret mode.

Every kernel has a plain-jnp reference beside it (`*_ref`) and an `interpret` argument that defaults
to True on the CPU backend. Packed int4 layout: pallas_kernels.int4. A leaf package: it imports jax and
numpy only (never prefixquant_jax or flax); matrices such as rotations come in as arguments.
"""
from pallas_kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    pack_kv_uint4,
    unpack_kv_uint4,
)
from pallas_kernels.gemm_mgpu import w4a4_matmul_mgpu, w4a8_matmul_mgpu
from pallas_kernels.gemm_w4a4 import w4a4_matmul, w4a4_matmul_ref
from pallas_kernels.gemm_w4a8 import w4a8_matmul, w4a8_matmul_ref
from pallas_kernels.gemv_mgpu import gemv_w4_mgpu
from pallas_kernels.gemv_w4 import dequantize_w4, gemv_w4, gemv_w4_ref
from pallas_kernels.int4 import pack_int4, unpack_int4
from pallas_kernels.rotate_quant import rotate_quant, rotate_quant_ref

__all__ = [
    "decode_attention",
    "decode_attention_ref",
    "dequantize_w4",
    "gemv_w4",
    "gemv_w4_mgpu",
    "gemv_w4_ref",
    "pack_int4",
    "pack_kv_uint4",
    "rotate_quant",
    "rotate_quant_ref",
    "unpack_int4",
    "unpack_kv_uint4",
    "w4a4_matmul",
    "w4a4_matmul_mgpu",
    "w4a4_matmul_ref",
    "w4a8_matmul",
    "w4a8_matmul_mgpu",
    "w4a8_matmul_ref",
]
