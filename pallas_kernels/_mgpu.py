"""Shared helpers of the Pallas Mosaic GPU kernels (gemm_mgpu.py, gemv_mgpu.py).

The Mosaic GPU kernels run compiled on Hopper (sm_90) and, off the GPU, in Pallas' GPU interpret mode
(jax._src.pallas.mosaic_gpu.interpret: TMA copies, barriers, warpgroup threads and shared memory
simulated on the CPU, optionally with a race detector). Two things differ between the two, and only
here:

* Transposed shared-memory views. Hopper's int8 wgmma needs both operands K-major in shared memory;
  Pallas passes the B operand as a logical [K, N] ref, so a K-major B is the transposed view
  `plgpu.transpose_ref(b_nk, (1, 0))` of an [N, K] buffer (an N-major int8 B does not lower:
  "ValueError: Only f16 WGMMA supports transposes"); the GEMV's weight operand is likewise the
  transposed view of the [K, N] tile it unpacks. jax 0.10.2's interpreter reads wgmma operands through
  indexing transforms only and fails on such a view ("AttributeError: 'TransposeTransform' object has
  no attribute 'indices'", gpu_callbacks.wgmma -> interpret utils.to_range; jax 0.11.0 is the same).
  So `transposable_scratch` / `store_transposable` / `transposed_view` keep the buffer as the value's
  shape and pass the transposed view on the GPU, and in interpret mode store the register value
  transposed and pass the buffer itself (register transposes have no Mosaic lowering, so this variant
  exists in interpret mode only). The MMA sees the same matrix either way;
  tests/pallas_kernels/test_mgpu_lowering.py lowers the GPU variant.
* Layout hints. `plgpu.load(ref, (), layout=...)` (needed on the GPU to broadcast a per-row or
  per-column vector over the WGMMA accumulator layout) has no interpret rule (its abstract eval asserts
  an AbstractRef); `load_hinted` reads `ref[...]` there. A layout hint does not change values.

`interpret_params` resolves a kernel's `interpret` argument; `install_thread_compile_cache` works around
the interpreter recompiling every warpgroup thread's jaxpr at every grid point (see there).
"""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import resolve_interpret

SMEM_BYTES = 227 * 1024  # an H100 / H200 thread block's shared memory
SMEM_BUDGET = SMEM_BYTES - 8 * 1024  # left for barriers and Mosaic's own scratch (reductions)


def _interpret_gpu_params_cls():
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # pragma: no cover - a jax without the GPU interpreter
        raise RuntimeError(f"this jax ({jax.__version__}) has no Pallas GPU interpret mode: {e}") from e
    return InterpretGPUParams


def interpret_params(interpret):
    """A kernel's `interpret` argument -> None (compile for the GPU) or the InterpretGPUParams to run with.

    None: interpret exactly when JAX's default backend is the CPU. True: default InterpretGPUParams
    (no race detection). An InterpretGPUParams instance is used as given (tests pass detect_races=True).
    """
    if interpret is None:
        interpret = resolve_interpret(None)
    if interpret is False:
        return None
    cls = _interpret_gpu_params_cls()
    return interpret if isinstance(interpret, cls) else cls()


def gpu_interpret_params(**kwargs):
    """InterpretGPUParams(**kwargs), e.g. detect_races=True."""
    return _interpret_gpu_params_cls()(**kwargs)


def races_found() -> bool:
    """Whether the GPU interpreter's race detector reported a race since the last reset (it prints one)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    try:
        return bool(interpret_pallas_call.get_races().races_found)
    except AssertionError:  # no kernel has run under the interpreter yet
        return False


def swizzled(minor_bytes: int, itemsize: int, swizzle: int | None = None):
    """(TilingTransform, SwizzleTransform) for a shared-memory tile whose rows are `minor_bytes` long:
    tiles of 8 rows x `swizzle` bytes (default: the largest swizzle <= 128 B dividing the row)."""
    sw = swizzle or plgpu.find_swizzle(minor_bytes * 8)
    return plgpu.TilingTransform((8, sw // itemsize)), plgpu.SwizzleTransform(sw)


def transposable_scratch(rows: int, cols: int, dtype, interpreting: bool, swizzle: int | None = None):
    """An SMEM buffer holding a [rows, cols] register value whose transpose an MMA reads
    (transposed_view); stored as is on the GPU, transposed in interpret mode (module docstring).
    swizzle: bytes (default: the largest that divides a row of `cols` elements)."""
    itemsize = jnp.dtype(dtype).itemsize
    if interpreting:
        return plgpu.SMEM((cols, rows), dtype)
    return plgpu.SMEM((rows, cols), dtype, transforms=swizzled(cols * itemsize, itemsize, swizzle))


def store_transposable(ref, value, interpreting: bool) -> None:
    """Write a [rows, cols] register value into a transposable_scratch buffer."""
    ref[...] = value.T if interpreting else value


def transposed_view(ref, interpreting: bool):
    """The logical [cols, rows] operand (the stored value's transpose) that wgmma reads from a
    transposable_scratch buffer."""
    return ref if interpreting else plgpu.transpose_ref(ref, (1, 0))


def load_hinted(ref, layout, interpreting: bool):
    """ref[...] in the given register layout (GPU); plain ref[...] in interpret mode."""
    return ref[...] if interpreting else plgpu.load(ref, (), layout=layout)


def row_vector_layout():
    """Layout of a [rows] vector broadcast along the columns of a WGMMA accumulator."""
    return plgpu.Layout.WGMMA.reduce(1)


def col_vector_layout():
    """Layout of a [cols] vector broadcast along the rows of a WGMMA accumulator."""
    return plgpu.Layout.WGMMA.reduce(0)


def nibbles(v):
    """Packed int8 bytes -> (low, high) sign-extended int4 codes as int8 (pallas_kernels.int4 layout).

    Mosaic GPU has no arithmetic on 8-bit registers other than bitwise ops, so the shifts run in int16:
    low = (b << 12) >> 12, high = b >> 4 on the sign-extended byte b."""
    v = v.astype(jnp.int16)
    lo = lax.shift_right_arithmetic(lax.shift_left(v, jnp.int16(12)), jnp.int16(12))
    hi = lax.shift_right_arithmetic(v, jnp.int16(4))
    return lo.astype(jnp.int8), hi.astype(jnp.int8)


def bytes_of_int16(v):
    """int16 words -> (low byte, high byte) as signed int8: the even and odd int8 codes of a pair
    (little-endian, as lax.bitcast_convert_type packs int8 [.., 2] into int16)."""
    lo = lax.shift_right_arithmetic(lax.shift_left(v, jnp.int16(8)), jnp.int16(8))
    hi = lax.shift_right_arithmetic(v, jnp.int16(8))
    return lo.astype(jnp.int8), hi.astype(jnp.int8)


def int8_pairs_as_int16(x):
    """int8 [M, K] (K even) -> int16 [M, K/2], each word holding codes (2j, 2j+1) (a bitcast)."""
    M, K = x.shape
    return lax.bitcast_convert_type(x.reshape(M, K // 2, 2), jnp.int16)


_cache_lock = threading.Lock()
_thread_executables: dict = {}


def install_thread_compile_cache() -> bool:
    """Cache the interpreter's per-thread executables (interpret mode only; idempotent).

    jax 0.10 / 0.11's GPU interpreter runs each warpgroup thread of each grid point through
    `thread_map._run_jaxpr`, which calls `jax.jit(...).trace(...).lower().compile()` every time: about
    1.5 s of XLA compilation per thread per grid point on this CPU, 90 % of an interpreted GEMM's time.
    The replacement compiles each (jaxpr, argument types) once and runs the same jaxpr with the same
    arguments, so results are unchanged. The cache keeps a reference to each jaxpr, so its id stays
    unique. Returns False (and changes nothing) where thread_map has no `_run_jaxpr`.
    """
    try:
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:  # pragma: no cover
        return False
    original = getattr(thread_map, "_run_jaxpr", None)
    if original is None:
        return False
    if getattr(original, "_pallas_kernels_cached", False):
        return True

    def _eval(jaxpr, consts, *args):
        jax.core.eval_jaxpr(jaxpr, consts, *args)

    def run_jaxpr_cached(jaxpr, consts, *args):
        leaves = (*jax.tree.leaves(consts), *args)
        key = (id(jaxpr), tuple((getattr(a, "shape", ()), str(getattr(a, "dtype", type(a)))) for a in leaves))
        with _cache_lock:
            entry = _thread_executables.get(key)
            if entry is None:
                exe = jax.jit(_eval, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile()
                entry = _thread_executables[key] = (jaxpr, exe)
        entry[1](consts, *args)

    run_jaxpr_cached._pallas_kernels_cached = True
    thread_map._run_jaxpr = run_jaxpr_cached
    return True
