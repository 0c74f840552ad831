#!/usr/bin/env bash
# Full-WikiText-2-test RESULTS.md rows for SmolLM2, resumable across killed runs and sessions.
#
# For each NAME (a preset, optionally + "-gptq" for GPTQ weights, then + "-ft" for block-wise fine-tuning):
#   1. quantize once and save it:  runs/models/NAME   (skipped when that directory exists;
#      -ft rows checkpoint their training in runs/ft/NAME and resume it)
#   2. evaluate the saved model:   prefixquant eval --model runs/models/NAME --eval-log runs/full/NAME.jsonl
#      (every finished window is logged; a rerun continues where the last one stopped)
# Results: runs/full/NAME.json. Usage: benchmarks/results_full.sh NAME [NAME ...]
#   e.g. benchmarks/results_full.sh fp w4a4kv4-static w4a4kv4-static-ft w4a4kv4-static-gptq-ft
set -euo pipefail
cd "$(dirname "$0")/.."
CS=${CALIB_SAMPLES:-16}
PQ=.venv/bin/prefixquant
mkdir -p runs/models runs/full runs/ft
for name in "$@"; do
  base=${name%-ft}
  preset=${base%-gptq}
  model=runs/models/$name
  [ "$name" = fp ] && model=smollm2  # nothing to quantize: the FP model itself
  if [ "$model" != smollm2 ] && [ ! -d "$model" ]; then
    cmd=($PQ quantize --model smollm2 --preset "$preset" --calib-samples "$CS" --no-eval --save "$model")
    [ "$base" != "$preset" ] && cmd+=(--gptq)
    if [ "$name" != "$base" ]; then
      if [ -d "runs/ft/$name" ]; then cmd+=(--resume "runs/ft/$name"); else cmd+=(--train --train-dir "runs/ft/$name"); fi
    fi
    echo "+ ${cmd[*]} --json runs/full/$name.quantize.json"
    "${cmd[@]}" --json "runs/full/$name.quantize.json"
  fi
  cmd=($PQ eval --model "$model" --eval-log "runs/full/$name.jsonl")
  echo "+ ${cmd[*]} --json runs/full/$name.json"
  "${cmd[@]}" --json "runs/full/$name.json"
done
