#!/usr/bin/env bash
# Issue [G]'s table: SmolLM2, the first 16 WikiText-2 test windows x 2048, 16 calibration samples, seed 0.
# For each NAME (a preset, optionally + "-gptq"): quantize once and save to runs/g16/NAME (skipped when it
# exists), then evaluate the saved model on 16 windows with a per-window log in results/g16/NAME.jsonl
# (a killed run resumes; a log that cannot be continued, another model's or of an older log format, is moved
# aside to NAME.jsonl.stale-N). Extra quantize flags (e.g. the old rules: --weight-clip mse) come from
# $QFLAGS, with $TAG appended to NAME so such rows never mix with the defaults' rows.
# Usage: benchmarks/results_g16.sh NAME [NAME ...]   then: python benchmarks/results_table_g16.py
set -euo pipefail
cd "$(dirname "$0")/.."
PQ=.venv/bin/prefixquant
OUT=results/g16
mkdir -p runs/g16 "$OUT"
for name in "$@"; do
  preset=${name%-gptq}
  row=$name${TAG:-}
  model=runs/g16/$row
  [ "$name" = fp ] && model=smollm2
  if [ "$model" != smollm2 ] && [ ! -d "$model" ]; then
    cmd=($PQ quantize --model smollm2 --preset "$preset" --calib-samples 16 --no-eval --save "$model" ${QFLAGS:-})
    [ "$name" != "$preset" ] && cmd+=(--gptq)
    echo "+ ${cmd[*]} --json $OUT/$row.quantize.json" | tee "$OUT/$row.quantize.cmd"
    "${cmd[@]}" --json "$OUT/$row.quantize.json"
  fi
  log=$OUT/$row.jsonl
  cmd=($PQ eval --model "$model" --max-windows 16 --eval-log "$log")
  echo "+ ${cmd[*]} --json $OUT/$row.json" | tee "$OUT/$row.eval.cmd"
  if ! "${cmd[@]}" --json "$OUT/$row.json" 2> >(tee "$OUT/.$row.err" >&2); then
    if grep -q -e "belongs to another evaluation" -e "was written in format" "$OUT/.$row.err"; then
      n=1; while [ -e "$log.stale-$n" ]; do n=$((n + 1)); done  # another model's log, or an older log format
      echo "! $log cannot be continued by $model: moved to $log.stale-$n, starting over"
      mv "$log" "$log.stale-$n"
      "${cmd[@]}" --json "$OUT/$row.json"
    else
      rm -f "$OUT/.$row.err"; exit 1
    fi
  fi
  rm -f "$OUT/.$row.err"
done
