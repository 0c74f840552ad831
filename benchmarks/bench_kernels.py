"""Time the Pallas kernels (Triton and Mosaic GPU) against bf16 XLA baselines on a GPU, side by side, and print ratios.

Usage:
    python benchmarks/bench_kernels.py [--json out.json|-] [--iters 50] [--warmup 5] [--no-sweep]
    python benchmarks/bench_kernels.py --allow-cpu      # tiny shapes in interpret mode: checks the script only

Cases (GPU):
  * W4A4 / W4A8 GEMM at M=2048, (K, N) in (4096, 4096), (4096, 14336), (14336, 4096) vs bf16 jnp.dot
  * W4A4 GEMM M sweep 16..8192 at K = N = 4096 vs bf16 jnp.dot, and M = 1 with block_n 128 / 64 / 32
  * W4 weight-only GEMV at M = 1, 8, 16 (per-channel and group-128 scales) vs bf16 jnp.dot, and at M = 1
    with block_n 16 / 32 (more programs than the default 64); weights cycled beyond the L2 on both sides
  * fused rotate + quantize (Hadamard, dynamic per-token int4) vs the W4A4 GEMM it feeds
  * decode attention, 2048-token int4 cache + 4-token FP prefix vs bf16 plain attention (GQA 32/8, hd 128),
    caches cycled beyond the L2 on both sides
"speedup" is baseline time / kernel time (> 1 means the kernel is faster); for rotate+quant the ratio
is its time as a fraction of the GEMM's. The GEMM and GEMV rows also time the Mosaic GPU kernels
(pallas_kernels.gemm_mgpu / gemv_mgpu) in the same run on the same inputs: "mosaic_ms", "mosaic_speedup"
(bf16 / Mosaic) and "mosaic_vs_triton" (Triton / Mosaic); the Mosaic GEMMs read K-major weights ([N, K/2],
copies made once, as a stored model would), and at M = 2048 and M = 1 (K = N = 4096) a row also times
them with the per-call weight transpose the runtime does today ("mosaic_transposing_ms"). Off the GPU
(--allow-cpu) the Mosaic kernels run in GPU interpret mode, for the first shapes only.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import (add_common_args, copies_beyond_l2, on_gpu_or_allowed, timeit,  # noqa: E402
                               timeit_cycle, write_json)

import jax
import jax.numpy as jnp
import numpy as np




def _rand_codes(key, shape, lo, hi):
    return jax.random.randint(key, shape, lo, hi, dtype=jnp.int32).astype(jnp.int8)


def _weight_copies(key, K: int, N: int):
    """(packed int4 [K/2, N] weights, bf16 [K, N] weights): random, as many copies of each as make a
    working set beyond the L2 (copies_beyond_l2), so neither side reads its weights from the cache."""
    from pallas_kernels import pack_int4

    n_int4, n_bf16 = copies_beyond_l2(K * N // 2), copies_beyond_l2(K * N * 2)
    keys = jax.random.split(key, max(n_int4, n_bf16))
    return ([pack_int4(_rand_codes(k, (K, N), -8, 8), axis=0) for k in keys[:n_int4]],
            [jax.random.normal(k, (K, N), jnp.bfloat16) for k in keys[:n_bf16]])


def _mosaic(row, t_mosaic, t_bf16, t_triton):
    row.update(mosaic_ms=t_mosaic, mosaic_speedup=t_bf16 / t_mosaic, mosaic_vs_triton=t_triton / t_mosaic)


def bench_gemm(M, K, N, kind, opt, rows, block_n=None, mosaic=True, mosaic_transposing=False):
    """Weights cycle through copies beyond the L2 on both sides (it matters at small M, where the GEMM
    is weight-bandwidth-bound). mosaic: also time the Mosaic GPU GEMM (K-major weight copies);
    mosaic_transposing: and the Mosaic GEMM on the [K/2, N] copies (transposed per call)."""
    from pallas_kernels import pack_int4, w4a4_matmul, w4a4_matmul_mgpu, w4a8_matmul, w4a8_matmul_mgpu

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(M + K + N), 3)
    w_int4, w_bf16 = _weight_copies(k2, K, N)
    ws = jnp.full((1, N), 0.01, jnp.float32)
    xs = jnp.full((M, 1), 0.02, jnp.float32)
    if kind == "w4a4":
        xq = pack_int4(_rand_codes(k1, (M, K), -8, 8), axis=-1)
        fn, mgpu = w4a4_matmul, w4a4_matmul_mgpu
    else:
        xq = _rand_codes(k1, (M, K), -128, 128)
        fn, mgpu = w4a8_matmul, w4a8_matmul_mgpu
    f = jax.jit(lambda x, w: fn(x, xs, w, ws, block_n=block_n, interpret=opt.interpret))
    xb = jax.random.normal(k3, (M, K), jnp.bfloat16)
    t_k = timeit_cycle(f, [(xq, w) for w in w_int4], iters=opt.iters, warmup=opt.warmup)
    t_b = timeit_cycle(jax.jit(jnp.dot), [(xb, w) for w in w_bf16], iters=opt.iters, warmup=opt.warmup)
    tops = 2 * M * K * N / (t_k * 1e-3) / 1e12
    row = {"case": f"{kind}_gemm", "M": M, "K": K, "N": N, "block_n": block_n, "kernel_ms": t_k, "bf16_ms": t_b,
           "speedup": t_b / t_k, "kernel_tops": tops, "weight_copies": [len(w_int4), len(w_bf16)]}
    if mosaic:
        fm = jax.jit(lambda x, wt: mgpu(x, xs, wt, ws, w_transposed=True, interpret=opt.interpret))
        _mosaic(row, timeit_cycle(fm, [(xq, w.T) for w in w_int4], iters=opt.iters, warmup=opt.warmup), t_b, t_k)
    if mosaic_transposing:
        ft = jax.jit(lambda x, w: mgpu(x, xs, w, ws, interpret=opt.interpret))
        row["mosaic_transposing_ms"] = timeit_cycle(ft, [(xq, w) for w in w_int4], iters=opt.iters, warmup=opt.warmup)
    rows.append(row)
    return t_k


def bench_gemv(M, K, N, group, opt, rows, block_n=None, mosaic=True):
    """Weight-bandwidth-bound: both sides cycle through enough weight copies that none stays in the L2.
    mosaic: also time the Mosaic GPU GEMV (same weights, its own tiles)."""
    from pallas_kernels import gemv_w4, gemv_w4_mgpu

    k1, k2 = jax.random.split(jax.random.PRNGKey(M * 7 + K + N))
    x = jax.random.normal(k1, (M, K), jnp.bfloat16)
    w_int4, w_bf16 = _weight_copies(k2, K, N)
    s = jnp.full((1 if group is None else K // group, N), 0.01, jnp.float32)
    f = jax.jit(lambda x, w: gemv_w4(x, w, s, block_n=block_n, interpret=opt.interpret))
    t_k = timeit_cycle(f, [(x, w) for w in w_int4], iters=opt.iters, warmup=opt.warmup)
    t_b = timeit_cycle(jax.jit(jnp.dot), [(x, w) for w in w_bf16], iters=opt.iters, warmup=opt.warmup)
    row = {"case": "w4_gemv", "M": M, "K": K, "N": N, "group": group, "block_n": block_n, "kernel_ms": t_k,
           "bf16_ms": t_b, "speedup": t_b / t_k, "weight_copies": [len(w_int4), len(w_bf16)],
           "kernel_weight_gbps": K * N / 2 / (t_k * 1e-3) / 1e9, "bf16_weight_gbps": K * N * 2 / (t_b * 1e-3) / 1e9}
    if mosaic:
        fm = jax.jit(lambda x, w: gemv_w4_mgpu(x, w, s, interpret=opt.interpret))
        _mosaic(row, timeit_cycle(fm, [(x, w) for w in w_int4], iters=opt.iters, warmup=opt.warmup), t_b, t_k)
    rows.append(row)


def bench_rotate(M, K, N, opt, rows):
    from pallas_kernels import rotate_quant
    from pallas_kernels.rotate_quant import rotate_quant_ref
    from prefixquant_jax.rotate.hadamard import hadamard_kron_factors

    x = jax.random.normal(jax.random.PRNGKey(K), (M, K), jnp.bfloat16)
    pair = hadamard_kron_factors(K)
    f = jax.jit(lambda x: rotate_quant(x, pair, interpret=opt.interpret))
    t_k = timeit(f, x, iters=opt.iters, warmup=opt.warmup)
    t_u = timeit(jax.jit(lambda x: rotate_quant_ref(x, pair)), x, iters=opt.iters, warmup=opt.warmup)
    t_g = bench_gemm(M, K, N, "w4a4", opt, [], mosaic=False)
    rows.append({"case": "rotate_quant", "M": M, "K": K, "N": N, "kernel_ms": t_k, "unfused_jnp_ms": t_u, "gemm_ms": t_g,
                     "fraction_of_gemm": t_k / t_g, "speedup": t_u / t_k})


def _plain_attention(q, k, v, lengths, pk, pv):
    """bf16 baseline: prefix + bf16 cache, GQA by repeat, masked softmax in f32."""
    B, H, hd = q.shape
    T, KV = k.shape[1], k.shape[2]
    P = pk.shape[0]
    k = jnp.concatenate([jnp.broadcast_to(pk, (B,) + pk.shape), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(pv, (B,) + pv.shape), v], axis=1)
    k, v = jnp.repeat(k, H // KV, axis=2), jnp.repeat(v, H // KV, axis=2)
    s = jnp.einsum("bhd,bthd->bht", q, k, preferred_element_type=jnp.float32) / np.sqrt(hd)
    valid = jnp.arange(P + T)[None, :] < (P + lengths)[:, None]
    p = jax.nn.softmax(jnp.where(valid[:, None, :], s, -jnp.inf), axis=-1)
    return jnp.einsum("bht,bthd->bhd", p.astype(v.dtype), v)


def bench_attention(B, H, KV, hd, T, P, opt, rows):
    from pallas_kernels import decode_attention

    ks = jax.random.split(jax.random.PRNGKey(B + T), 6)
    q = jax.random.normal(ks[0], (B, H, hd), jnp.bfloat16)
    kc = jax.random.randint(ks[1], (B, T, KV, hd // 2), -128, 128, jnp.int32).astype(jnp.int8)
    vc = jax.random.randint(ks[2], (B, T, KV, hd // 2), -128, 128, jnp.int32).astype(jnp.int8)
    pk = jax.random.normal(ks[3], (P, KV, hd), jnp.bfloat16)
    pv = jax.random.normal(ks[4], (P, KV, hd), jnp.bfloat16)
    lengths = jnp.full((B,), T, jnp.int32)
    sc, zr = jnp.full((KV,), 0.1, jnp.float32), jnp.full((KV,), 8.0, jnp.float32)
    # cache-bandwidth-bound: cycle through enough caches (copies) that none stays in the L2
    n_int4, n_bf16 = copies_beyond_l2(2 * kc.size), copies_beyond_l2(4 * B * T * KV * hd)
    int4_sets = [(q, jnp.roll(kc, i, axis=1), jnp.roll(vc, i, axis=1), lengths) for i in range(n_int4)]
    kbs = [jax.random.normal(k, (B, T, KV, hd), jnp.bfloat16) for k in jax.random.split(ks[5], n_bf16)]
    bf16_sets = [(q, kb, kb[:, ::-1], lengths, pk, pv) for kb in kbs]
    f = jax.jit(lambda q, kc, vc, L: decode_attention(q, kc, vc, L, sc, zr, sc, zr, pk, pv, interpret=opt.interpret))
    t_k = timeit_cycle(f, int4_sets, iters=opt.iters, warmup=opt.warmup)
    t_b = timeit_cycle(jax.jit(_plain_attention), bf16_sets, iters=opt.iters, warmup=opt.warmup)
    rows.append({"case": "decode_attention", "B": B, "H": H, "KV": KV, "head_dim": hd, "T": T, "P": P, "kernel_ms": t_k,
                 "bf16_ms": t_b, "speedup": t_b / t_k, "cache_copies": [n_int4, n_bf16]})


def _fmt(r):
    shape = " ".join(f"{k}={r[k]}" for k in ("M", "K", "N", "group", "block_n", "B", "H", "KV", "head_dim", "T", "P")
                     if k in r and r[k] is not None)
    head = f"{r['case']:<17} {shape:<40} kernel {r['kernel_ms']:.4f} ms"
    if "gemm_ms" in r:
        return (f"{head}  w4a4 gemm {r['gemm_ms']:.4f} ms  rotate/gemm {r['fraction_of_gemm']:.3f}  "
                f"unfused jnp {r['unfused_jnp_ms']:.4f} ms  speedup vs unfused {r['speedup']:.2f}x")
    line = f"{head}  bf16 {r['bf16_ms']:.4f} ms  speedup {r['speedup']:.2f}x"
    if "mosaic_ms" in r:
        line += (f"  | mosaic {r['mosaic_ms']:.4f} ms  speedup {r['mosaic_speedup']:.2f}x  "
                 f"vs triton {r['mosaic_vs_triton']:.2f}x")
    if "mosaic_transposing_ms" in r:
        line += f"  (with per-call weight transpose {r['mosaic_transposing_ms']:.4f} ms)"
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, iters=50, warmup=5)
    ap.add_argument("--no-sweep", action="store_true", help="skip the W4A4 M sweep")
    opt = ap.parse_args(argv)

    backend = jax.default_backend()
    gpu = on_gpu_or_allowed("bench_kernels", opt.allow_cpu)
    if gpu is None:
        return 0
    if not gpu:
        opt.interpret, opt.iters, opt.warmup = True, 1, 1
        gemm_shapes, sweep = [(128, 64)], [16, 32]
        gemv_shapes, gemv_ms, rot_shapes = [(128, 64)], [1, 3], [(16, 576, 64)]
        attn = [(2, 8, 2, 64, 48, 4)]
        M0 = 32
    else:
        opt.interpret = False
        gemm_shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
        sweep = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
        gemv_shapes, gemv_ms = gemm_shapes, [1, 8, 16]
        rot_shapes = [(2048, 4096, 4096), (2048, 4096, 14336), (2048, 14336, 4096)]
        attn = [(1, 32, 8, 128, 2048, 4), (8, 32, 8, 128, 2048, 4)]
        M0 = 2048

    rows = []
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({backend}), jax {jax.__version__}, iters {opt.iters}")

    def run(fn, *a, **kw):
        fn(*a, opt, rows, **kw)
        print(_fmt(rows[-1]), flush=True)

    for i, (K, N) in enumerate(gemm_shapes):
        run(bench_gemm, M0, K, N, "w4a4", mosaic_transposing=i == 0)
        run(bench_gemm, M0, K, N, "w4a8")
    if not opt.no_sweep:
        K, N = gemm_shapes[0]
        for M in sweep:
            run(bench_gemm, M, K, N, "w4a4", mosaic=gpu)  # off the GPU: Mosaic (interpreted) on the first rows only
        for bn in (None, 64, 32):  # decode (M = 1): block_n 128 (default) gives only N / 128 programs
            run(bench_gemm, 1, K, N, "w4a4", block_n=bn, mosaic=gpu and bn is None, mosaic_transposing=gpu and bn is None)
    for i, (K, N) in enumerate(gemv_shapes):
        for j, M in enumerate(gemv_ms):
            run(bench_gemv, M, K, N, None, mosaic=gpu or i == j == 0)
        run(bench_gemv, gemv_ms[-1], K, N, 128 if K % 128 == 0 and K > 128 else 64, mosaic=gpu)
    K, N = gemv_shapes[0]
    for bn in (16, 32):  # occupancy variants at M = 1: the default block_n 64 gives N / 64 programs
        run(bench_gemv, gemv_ms[0], K, N, None, block_n=bn, mosaic=False)
    for M, K, N in rot_shapes:
        run(bench_rotate, M, K, N)
    for a in attn:
        run(bench_attention, *a)

    if opt.json:
        doc = {"device": dev.device_kind, "backend": backend, "jax": jax.__version__, "interpret": opt.interpret,
                   "iters": opt.iters, "results": rows}
        write_json(doc, opt.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
