+ .venv/bin/prefixquant quantize --model smollm2 --preset w8a8kv8-static --calib-samples 16 --no-eval --save runs/models/w8a8kv8-static --json results/lm_eval/w8a8kv8-static.quantize.json
