#!/usr/bin/env bash
# RESULTS.md zero-shot rows: the shipped offline task lambada_wikitext2 (fake backend) for SmolLM2 presets.
#
# For each NAME (fp, or a full-test row name as in benchmarks/results_full.sh: PRESET[-gptq][-ft]):
#   1. the saved model $MODELS/NAME (default runs/models, the full-test script's); quantized here with
#      the full-test command (results/full/NAME.quantize.cmd: --calib-samples 16, --train-dir runs/ft/NAME when
#      it trains; its --json goes to results/lm_eval/NAME.quantize.json) when that directory does not exist
#   2. prefixquant lm-eval --model $MODELS/NAME --tasks $TASKS --json results/lm_eval/NAME.json
# Usage: benchmarks/lm_eval_rows.sh NAME [NAME ...]     e.g. MODELS=runs/lm_eval_models benchmarks/lm_eval_rows.sh fp quarot-w4a4kv4
set -euo pipefail
cd "$(dirname "$0")/.."
CS=${CALIB_SAMPLES:-16}
MODELS=${MODELS:-runs/models}
TASKS=${TASKS:-lambada_wikitext2}
PQ=.venv/bin/prefixquant
OUT=results/lm_eval
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
mkdir -p "$MODELS" "$OUT"
for name in "$@"; do
  base=${name%-ft}
  preset=${base%-gptq}
  model=$MODELS/$name
  [ "$name" = fp ] && model=smollm2
  if [ "$model" != smollm2 ] && [ ! -d "$model" ]; then
    cmd=($PQ quantize --model smollm2 --preset "$preset" --calib-samples "$CS" --no-eval --save "$model")
    [ "$base" != "$preset" ] && cmd+=(--gptq)
    if [ "$name" != "$base" ] || [[ $preset == flatquant-* ]]; then cmd+=(--train --train-dir "runs/ft/$name"); fi
    cmd+=(--json "$OUT/$name.quantize.json")
    echo "+ ${cmd[*]}" | tee "$OUT/$name.quantize.cmd"
    /usr/bin/time -f "quantize %e s" "${cmd[@]}"
  fi
  cmd=($PQ lm-eval --model "$model" --tasks "$TASKS" --json "$OUT/$name.json")
  echo "+ ${cmd[*]}" | tee "$OUT/$name.cmd"
  "${cmd[@]}" 2> "$OUT/.$name.err" || { tail -3 "$OUT/.$name.err"; exit 1; }
  rm -f "$OUT/.$name.err"
done
