"""Print RESULTS.md's full-test table from what benchmarks/results_full.sh wrote to results/full/.

One row per NAME with an eval report NAME.json: ppl, ratio to our FP row (fp.json) and to the
transformers fp32 reference 21.967 (project brief), windows, quantize (+ train) and eval seconds,
and the exact commands (NAME.quantize.cmd, NAME.eval.cmd).
Usage: python benchmarks/results_full_table.py [results/full]
"""
import glob
import json
import os
import sys

TRANSFORMERS_FP32 = 21.967
ORDER = ["fp", "quarot-w4a4kv4", "w4a4kv4-static-noprefix", "w4a4kv4-static", "w4a4kv4-dynamic", "w4a8kv4-static",
         "w8a8kv8-static", "flatquant-w4a4kv4", "flatquant-w4a4kv4-static-prefix"]


def _order(name: str):
    base = name.removesuffix("-ft").removesuffix("-gptq")
    return (ORDER.index(base) if base in ORDER else len(ORDER), name)


def _cmd(path: str) -> str:
    if not os.path.exists(path):
        return ""
    return open(path).read().strip().removeprefix("+ ").replace(".venv/bin/prefixquant", "prefixquant")


def main(out_dir: str) -> None:
    reports = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(out_dir, "*.json")))
               if not p.endswith(".quantize.json")}
    fp = reports.get("fp", {}).get("ppl")
    print("| row | prefix | ppl | × our FP | × transformers FP | windows | quantize (+FT) s | eval s | commands |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in sorted(reports.items(), key=lambda kv: _order(kv[0])):
        q = os.path.join(out_dir, name + ".quantize.json")
        qs, prefix = "-", "-"
        if os.path.exists(q):
            qr = json.load(open(q))
            prefix = " ".join(repr(t) for t in qr.get("prefix_text") or []).replace("|", "\\|") or "-"
            train = qr.get("report", {}).get("train")
            qs = f"{qr['quantize_seconds']:.0f}" + (f" (FT {train['seconds']:.0f})" if train else "")
        cmds = [c for c in (_cmd(os.path.join(out_dir, name + ".quantize.cmd")), _cmd(os.path.join(out_dir, name + ".eval.cmd"))) if c]
        ratio = f"{r['ppl'] / fp:.3f}" if fp else "-"
        print(f"| `{name}` | {prefix} | {r['ppl']:.3f} | {ratio} | {r['ppl'] / TRANSFORMERS_FP32:.3f} | {r['windows']} × {r['seqlen']} | "
              f"{qs} | {r['seconds']:.0f}" + (f" ({r['windows_from_log']} windows from the log)" if r.get('windows_from_log') else "") + " | " + "<br>".join(f"`{c}`" for c in cmds) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/full")
