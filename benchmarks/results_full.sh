#!/usr/bin/env bash
# Full-WikiText-2-test RESULTS.md rows for SmolLM2, resumable across killed runs and sessions.
#
# For each NAME (a preset, optionally + "-gptq" for GPTQ weights, then + "-ft" for block-wise fine-tuning;
# flatquant-* presets always train, with or without "-ft"):
#   1. quantize once and save it:  runs/models/NAME   (skipped when that directory exists;
#      -ft rows checkpoint their training in runs/ft/NAME and resume it)
#   2. evaluate the saved model:   prefixquant eval --model runs/models/NAME --eval-log results/full/NAME.jsonl
#      (every finished window is logged; a rerun continues where the last one stopped)
# Saved models (hundreds of MB) stay in the untracked runs/; the logs and JSON reports are small and go
# to results/full/ (tracked), so a row survives a new checkout. A re-quantized model that is not
# bit-identical to the one a log was written for cannot reuse it, nor can a log of an older log format
# (prefixquant-ppl-log/1, before the FP prefix was model state): that log is moved aside to
# NAME.jsonl.stale-N (never deleted) and the evaluation starts over. A saved model of an older format
# (runs/models/NAME of prefixquant-quantized/1) is refused by `eval` in one line: move it away to re-quantize.
# Then `python benchmarks/results_full_table.py` prints the RESULTS.md table.
# Extra quantize flags (e.g. --lr-weight 5e-5) come from $QFLAGS, with $TAG appended to NAME so such rows
# never mix with the defaults' rows.
# Usage: [QFLAGS="..." TAG=-x] benchmarks/results_full.sh NAME [NAME ...]
#   e.g. benchmarks/results_full.sh fp w4a4kv4-static w4a4kv4-static-ft w4a4kv4-static-gptq-ft
set -euo pipefail
cd "$(dirname "$0")/.."
CS=${CALIB_SAMPLES:-16}
PQ=.venv/bin/prefixquant
OUT=results/full
mkdir -p runs/models runs/ft "$OUT"
for row in "$@"; do
  name=$row${TAG:-}
  base=${row%-ft}
  preset=${base%-gptq}
  model=runs/models/$name
  [ "$row" = fp ] && model=smollm2  # nothing to quantize: the FP model itself
  if [ "$model" != smollm2 ] && [ ! -d "$model" ]; then
    cmd=($PQ quantize --model smollm2 --preset "$preset" --calib-samples "$CS" --no-eval --save "$model" ${QFLAGS:-})
    [ "$base" != "$preset" ] && cmd+=(--gptq)
    if [ "$row" != "$base" ] || [[ $preset == flatquant-* ]]; then  # FlatQuant always trains
      if [ -d "runs/ft/$name" ]; then cmd+=(--resume "runs/ft/$name"); else cmd+=(--train --train-dir "runs/ft/$name"); fi
    fi
    echo "+ ${cmd[*]} --json $OUT/$name.quantize.json" | tee "$OUT/$name.quantize.cmd"
    "${cmd[@]}" --json "$OUT/$name.quantize.json"
  fi
  log=$OUT/$name.jsonl
  cmd=($PQ eval --model "$model" --eval-log "$log")
  echo "+ ${cmd[*]} --json $OUT/$name.json" | tee "$OUT/$name.eval.cmd"
  if ! "${cmd[@]}" --json "$OUT/$name.json" 2> >(tee "$OUT/.$name.err" >&2); then
    if grep -q -e "belongs to another evaluation" -e "was written in format" "$OUT/.$name.err"; then
      n=1; while [ -e "$log.stale-$n" ]; do n=$((n + 1)); done
      echo "! $log was written for a model that is not bit-identical to $model (or in an older log format): moved to $log.stale-$n, starting over"
      mv "$log" "$log.stale-$n"
      "${cmd[@]}" --json "$OUT/$name.json"
    else
      rm -f "$OUT/.$name.err"; exit 1
    fi
  fi
  rm -f "$OUT/.$name.err"
done
