+ .venv/bin/prefixquant quantize --model smollm2 --preset quarot-w4a4kv4 --calib-samples 16 --no-eval --save runs/models/quarot-w4a4kv4 --json results/lm_eval/quarot-w4a4kv4.quantize.json
