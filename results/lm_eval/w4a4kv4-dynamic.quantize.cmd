+ .venv/bin/prefixquant quantize --model smollm2 --preset w4a4kv4-dynamic --calib-samples 16 --no-eval --save runs/models/w4a4kv4-dynamic --json results/lm_eval/w4a4kv4-dynamic.quantize.json
