#!/usr/bin/env bash
# Issue [M]'s FlatQuant rows (flatquant-w4a4kv4[-prefix][-hadamard]): SmolLM2, the first 16 WikiText-2 test windows x 2048, 16 calibration samples, seed 0,
# the `fast` training budget. For each NAME: train once into runs/ft/m16-NAME (a
# killed run resumes), save the merged RTN model, then GPTQ on the same trained transforms (--resume: the training
# is restored, not redone) and save that too; evaluate both on 16 windows with per-window logs in results/m16/.
# Usage: benchmarks/results_m16.sh NAME [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PQ=.venv/bin/prefixquant
OUT=results/m16
mkdir -p runs/m16 "$OUT"
for name in "$@"; do
  case $name in
    flatquant-w4a4kv4) flags=(--preset flatquant-w4a4kv4) ;;
    flatquant-w4a4kv4-hadamard) flags=(--preset flatquant-w4a4kv4 --flat-start hadamard) ;;
    flatquant-w4a4kv4-prefix-hadamard) flags=(--preset flatquant-w4a4kv4-prefix --flat-start hadamard) ;;
    *) echo "error: unknown row $name" >&2; exit 2 ;;
  esac
  for gptq in "" "-gptq"; do
    row=$name$gptq
    if [ ! -d "runs/m16/$row" ]; then
      cmd=($PQ quantize --model smollm2 "${flags[@]}" --calib-samples 16 --no-eval --save "runs/m16/$row")
      if [ -z "$gptq" ]; then
        [ -d "runs/ft/m16-$name" ] && cmd+=(--resume "runs/ft/m16-$name") || cmd+=(--train-dir "runs/ft/m16-$name")
      else
        cmd+=(--gptq --resume "runs/ft/m16-$name")
      fi
      echo "+ ${cmd[*]} --json $OUT/$row.quantize.json" | tee "$OUT/$row.quantize.cmd"
      "${cmd[@]}" --json "$OUT/$row.quantize.json"
    fi
    cmd=($PQ eval --model "runs/m16/$row" --max-windows 16 --eval-log "$OUT/$row.jsonl")
    echo "+ ${cmd[*]} --json $OUT/$row.json" | tee "$OUT/$row.eval.cmd"
    "${cmd[@]}" --json "$OUT/$row.json"
  done
done
