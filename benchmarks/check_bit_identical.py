"""Refactors must not move a number ([J]): fp, w4a4kv4-static and flatquant-w4a4kv4 perplexity on the first
2 WikiText-2 test windows, compared bit for bit (the float64 ppl and every window's NLL sum) with a record.

    python benchmarks/check_bit_identical.py --record results/bitexact/smollm2-2windows.json   # on the old tree
    python benchmarks/check_bit_identical.py --check  results/bitexact/smollm2-2windows.json   # on the new one

Small, fixed budget so that it runs in minutes on the CPU: 4 calibration samples × 512 (2 of them in the
searches), FlatQuant trained for 1 epoch on 4 samples × 256. Each row runs the real CLI
(`prefixquant quantize ... --max-windows 2 --eval-log`); exit 1 and a one-line `error:` if a number differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROWS = {
    "fp": ["--preset", "fp"],
    "w4a4kv4-static": ["--preset", "w4a4kv4-static"],
    "flatquant-w4a4kv4": ["--preset", "flatquant-w4a4kv4", "--train", "--train-samples", "4", "--train-seqlen", "256",
                          "--epochs", "1", "--train-batch-size", "2"],
}
COMMON = ["--model", "smollm2", "--calib-samples", "4", "--grid-samples", "2", "--max-windows", "2", "--no-fp"]


def run_row(name: str, args: list[str], tmp: str) -> dict:
    log, out = os.path.join(tmp, f"{name}.jsonl"), os.path.join(tmp, f"{name}.json")
    cmd = [os.path.join(os.path.dirname(sys.executable), "prefixquant"), "quantize", *COMMON, *args,
           "--eval-log", log, "--json", out]
    subprocess.run(cmd, check=True)
    with open(out) as f:
        res = json.load(f)
    with open(log) as f:
        windows = [json.loads(line) for line in f if line.strip()]
    return {"ppl": res["ppl"], "window_nll": [w["nll"] for w in windows if "nll" in w], "command": " ".join(cmd[1:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="JSON")
    mode.add_argument("--check", metavar="JSON")
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args(argv)
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"error: unknown row {unknown[0]!r} (one of {', '.join(ROWS)})", file=sys.stderr)
        return 2
    if args.check and not os.path.exists(args.check):
        print(f"error: {args.check}: no record (make one with --record on the reference tree)", file=sys.stderr)
        return 2
    if args.record and os.path.exists(args.record):
        print(f"error: {args.record} exists; not overwriting a record", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        got = {n: run_row(n, ROWS[n], tmp) for n in names}
    if args.record:
        os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(args.record, "w") as f:
            json.dump({"commit": rev, "rows": got}, f, indent=1)
        print(json.dumps({n: r["ppl"] for n, r in got.items()}))
        return 0
    with open(args.check) as f:
        want = json.load(f)["rows"]
    bad = [n for n in names if (got[n]["ppl"], got[n]["window_nll"]) != (want[n]["ppl"], want[n]["window_nll"])]
    for n in names:
        print(f"{n:20s} recorded {want[n]['ppl']!r:22} now {got[n]['ppl']!r:22} {'DIFFERS' if n in bad else 'identical'}")
    if bad:
        print(f"error: {', '.join(bad)} moved (not bit-identical to the record)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
