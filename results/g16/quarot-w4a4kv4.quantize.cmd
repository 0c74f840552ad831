+ .venv/bin/prefixquant quantize --model smollm2 --preset quarot-w4a4kv4 --calib-samples 16 --no-eval --save runs/g16/quarot-w4a4kv4 --json results/g16/quarot-w4a4kv4.quantize.json
