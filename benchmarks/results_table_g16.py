"""Issue [G]'s table from benchmarks/results_g16.sh's logs: the first 16 WikiText-2 test windows x 2048.

Per row: our ppl now (results/g16/NAME.jsonl), the authors' code on the same windows and budget (issue [G]; the
W4A8 figure measured as RESULTS.md says), ours before [G] (the first 16 windows of results/full/BASE.jsonl,
the per-window logs of the full-test rows) and in how many of the 16 windows we are now lower than before.
Usage: python benchmarks/results_table_g16.py [results/g16]
"""
import glob
import json
import math
import os
import sys

REFERENCE = {"fp": 20.82, "quarot-w4a4kv4": 99.51, "w4a4kv4-static": 58.85, "w4a4kv4-static-noprefix": 271.63,
             "w4a4kv4-dynamic": 57.05, "w4a8kv4-static": 31.77}
SEQ, N = 2048, 16


def window_nll(path: str) -> list[float]:
    rows = [json.loads(line) for line in open(path)][1:]
    out = {}
    for r in rows:
        if r["count"] != 1:
            raise SystemExit(f"error: {path}: batched log rows are not supported here")
        out[r["start"]] = r["nll"]
    return [out[i] for i in range(N) if i in out]


def ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / (len(nll) * (SEQ - 1)))


def main(out_dir: str) -> None:
    print("| row | ours (16 windows) | authors' code | ours / authors' | ours before [G] | windows lower than before |")
    print("|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(out_dir, "*.jsonl"))):
        name = os.path.basename(path)[:-6]
        now = window_nll(path)
        if len(now) < N:
            print(f"| `{name}` | ({len(now)} of {N} windows) | | | | |")
            continue
        base = name.split("@")[0]
        ref = REFERENCE.get(base.removesuffix("-gptq")) if not base.endswith("-gptq") else None
        old_path = os.path.join("results/full", base + ".jsonl")
        old = window_nll(old_path) if os.path.exists(old_path) else []
        old_cell = f"{ppl(old):.2f}" if len(old) == N else "-"
        lower = f"{sum(a < b for a, b in zip(now, old))} / {N}" if len(old) == N else "-"
        ref_cell, ratio = (f"{ref:.2f}", f"{ppl(now) / ref:.3f}") if ref else ("-", "-")
        print(f"| `{name}` | **{ppl(now):.2f}** | {ref_cell} | {ratio} | {old_cell} | {lower} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/g16")
