"""Compile the Pallas kernels for Hopper (sm_90) without a GPU and report their resource usage.

jax lowers a kernel for CUDA on any machine (`lowering_platforms=("cuda",)`: Pallas -> Triton IR in
Python); the `triton` package then compiles that IR to PTX and a cubin offline, with the ptxas it
bundles. Per kernel this gives what decides whether it can run and whether it runs well:
  shared memory (bytes; an H100 block may use 227 KB), registers per thread (255 is the cap),
  stack bytes (> 0: registers spilled to local memory), and the MMA instructions in the PTX (int8 wgmma
  for the W4A4/W4A8 GEMMs, i.e. the int4 codes really run on int8 tensor cores).
What it cannot give: speed, and failures at launch. Needs `pip install triton` (CPU machines too:
nothing here touches a driver). Used by tests/pallas_kernels/test_sm90_compile.py and by

    python -m pallas_kernels.sm90_check [--json OUT]      # the GPU benchmark shapes

The Triton IR is taken from jax's Pallas Triton lowering (`lower_jaxpr_to_triton_module`, a private
function, wrapped while lowering): the IR text jax would hand to XLA's Triton compiler on a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import jax


@dataclasses.dataclass(frozen=True)
class Sm90Report:
    kernel: str
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    stack_bytes: int
    mma: tuple[str, ...]  # distinct MMA instruction names in the PTX


def triton_ir(fn, *args) -> list[tuple[str, str, int, int]]:
    """[(name, Triton IR text, num_warps, num_stages)] of the Pallas kernels in fn(*args) lowered for
    CUDA, in lowering order. fn must call the kernels with interpret=False; args may be ShapeDtypeStructs.
    Raises RuntimeError if a call lowers through Mosaic GPU. Needs jax, not triton."""
    from jax._src.pallas.triton import lowering

    modules = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    # the target GPU, for jax >= 0.11, whose Triton lowering reads it from the device (none here) or from
    # an abstract mesh; jax 0.10 assumes sm_90 when it finds no GPU
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    lowering.lower_jaxpr_to_triton_module = capture
    try:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
            hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    if "mosaic" in hlo.lower():
        raise RuntimeError("a Pallas call lowered through Mosaic GPU instead of Triton (no triton_params?)")
    calls = [line for line in hlo.splitlines() if "__gpu$xla.gpu.triton" in line]
    if len(calls) != len(modules):
        raise RuntimeError(f"{len(modules)} Triton modules lowered but {len(calls)} calls in the HLO")
    out = []
    for text, call in zip(modules, calls):
        field = lambda k: re.search(k + r' = ("?)([\w.]+)\1', call).group(2)  # noqa: E731
        out.append((field("name"), text, int(field("num_warps")), int(field("num_stages"))))
    return out


def compile_sm90(name: str, ir_text: str, num_warps: int, num_stages: int, arch: int = 90) -> Sm90Report:
    """Compile Triton IR text for sm_`arch` with the triton package; resources from cuobjdump."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.ttir")
        with open(path, "w") as f:
            f.write(ir_text)
        k = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        cubin = os.path.join(d, f"{name}.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    mma = tuple(sorted(set(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", k.asm["ptx"]))))
    return Sm90Report(kernel=name, num_warps=num_warps, num_stages=num_stages, shared_bytes=int(k.metadata.shared),
                      registers=int(reg.group(1)), stack_bytes=int(stack.group(1)), mma=mma)


def check(fn, *args) -> list[Sm90Report]:
    """Sm90Report of every Pallas kernel in fn(*args) (see triton_ir)."""
    return [compile_sm90(*t) for t in triton_ir(fn, *args)]


def benchmark_cases():
    """(label, fn, args) of the kernels at the GPU benchmark shapes (benchmarks/bench_kernels.py, Llama-3-8B)."""
    import jax.numpy as jnp

    from pallas_kernels import decode_attention, gemv_w4, rotate_quant, w4a4_matmul, w4a8_matmul

    S, F32, I8, BF16 = jax.ShapeDtypeStruct, jnp.float32, jnp.int8, jnp.bfloat16
    cases = []
    for M, K, N in [(2048, 4096, 4096), (2048, 4096, 14336), (2048, 14336, 4096), (1, 4096, 4096), (16, 4096, 4096),
                    (32, 4096, 4096), (64, 4096, 4096), (8192, 4096, 4096)]:  # every tile shape of the M sweep
        w, ws, xs = S((K // 2, N), I8), S((1, N), F32), S((M, 1), F32)
        cases.append((f"w4a4 M={M} K={K} N={N}", lambda x, xs, w, ws: w4a4_matmul(x, xs, w, ws, interpret=False),
                      (S((M, K // 2), I8), xs, w, ws)))
        cases.append((f"w4a8 M={M} K={K} N={N}", lambda x, xs, w, ws: w4a8_matmul(x, xs, w, ws, interpret=False),
                      (S((M, K), I8), xs, w, ws)))
    for M in (1, 8, 16):
        for K, N, g in [(4096, 4096, None), (4096, 14336, 128), (14336, 4096, None)]:
            s = S((1, N) if g is None else (K // g, N), F32)
            cases.append((f"gemv_w4 M={M} K={K} N={N} group={g}", lambda x, w, s: gemv_w4(x, w, s, interpret=False),
                          (S((M, K), BF16), S((K // 2, N), I8), s)))
    for M, K, n2 in [(2048, 4096, 64), (2048, 14336, 128)]:  # the Hadamard pair's shapes (values do not matter)
        pair = (jnp.eye(K // n2), jnp.eye(n2))
        cases.append((f"rotate_quant M={M} K={K}", lambda x, pair=pair: rotate_quant(x, pair, interpret=False),
                      (S((M, K), BF16),)))
    for B, P in [(1, 4), (4, 0)]:
        h = S((8,), F32)
        args = (S((B, 32, 128), BF16), S((B, 2048, 8, 64), I8), S((B, 2048, 8, 64), I8), S((B,), jnp.int32), h, h, h, h)
        args += (S((P, 8, 128), BF16),) * 2 if P else ()
        cases.append((f"decode_attention B={B} T=2048 P={P}", lambda *a: decode_attention(*a, interpret=False), args))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="also write the reports as JSON to PATH")
    opt = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: this check needs the triton package (pip install 'triton==3.9.*'; no GPU needed)",
              file=sys.stderr)
        return 2
    rows = []
    for label, fn, args in benchmark_cases():
        for r in check(fn, *args):
            rows.append({"case": label, **dataclasses.asdict(r)})
            print(f"{label:<40} warps {r.num_warps} stages {r.num_stages}  smem {r.shared_bytes / 1024:6.1f} KB  "
                  f"regs {r.registers:3d}  stack {r.stack_bytes:5d} B  {' '.join(r.mma)}", flush=True)
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump({"target": "sm_90", "jax": jax.__version__, "triton": __import__("triton").__version__,
                       "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
