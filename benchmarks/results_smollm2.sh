#!/usr/bin/env bash
# Produces the RESULTS.md rows: every preset on the same WikiText-2 test windows of SmolLM2.
# Usage: benchmarks/results_smollm2.sh [MAX_WINDOWS] [CALIB_SAMPLES]   (omit MAX_WINDOWS for the full test)
set -euo pipefail
cd "$(dirname "$0")/.."
MW=${1:-}
CS=${2:-32}
OUT=runs/results
mkdir -p "$OUT"
extra=()
[ -n "$MW" ] && extra=(--max-windows "$MW")
for preset in fp quarot-w4a4kv4 w4a4kv4-static w4a4kv4-dynamic w4a4kv4-static-noprefix w8a8kv8-static w4a8kv4-static; do
  cmd=(.venv/bin/prefixquant quantize --model smollm2 --preset "$preset" --calib-samples "$CS" "${extra[@]}" --no-fp --json "$OUT/$preset.json")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" 2>>"$OUT/stderr.log" | grep -v "^$"
done
