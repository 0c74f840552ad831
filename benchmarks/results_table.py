"""Print the RESULTS.md table from benchmarks/results_smollm2.sh output (runs/results/*.json + the log); each
quantize JSON names its preset under "recipe".

Usage: python benchmarks/results_table.py runs/results.log
"""
import json
import os
import sys


def main(log_path: str) -> None:
    rows, fp = [], None
    for line in open(log_path):
        if not line.startswith("+ "):
            continue
        cmd = line[2:].strip().replace(".venv/bin/prefixquant", "prefixquant")
        out = cmd.split("--json ")[1].split()[0]
        if not os.path.exists(out):
            continue
        r = json.load(open(out))
        if r["recipe"] == "fp":
            fp = r["ppl"]
        rows.append((r, cmd))
    print("| preset | prefix | ppl | × FP | windows × seqlen | quantize + eval s | command |")
    print("|---|---|---|---|---|---|---|")
    for r, cmd in rows:
        prefix = (" ".join(repr(t) for t in r.get("prefix_text", [])) or "-").replace("|", "\\|")  # a pipe would split the cell
        ratio = f"{r['ppl'] / fp:.3f}" if fp else "-"
        print(f"| `{r['recipe']}` | {prefix} | {r['ppl']:.3f} | {ratio} | {r['windows']} × {r['seqlen']} | "
              f"{r['seconds']:.0f} | `{cmd.replace(' --json ' + cmd.split('--json ')[1].split()[0], '')}` |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/results.log")
