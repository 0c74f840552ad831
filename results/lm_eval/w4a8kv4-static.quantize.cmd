+ .venv/bin/prefixquant quantize --model smollm2 --preset w4a8kv4-static --calib-samples 16 --no-eval --save runs/models/w4a8kv4-static --json results/lm_eval/w4a8kv4-static.quantize.json
