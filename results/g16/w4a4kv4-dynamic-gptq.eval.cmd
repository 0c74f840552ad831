+ .venv/bin/prefixquant eval --model runs/g16/w4a4kv4-dynamic-gptq --max-windows 16 --eval-log results/g16/w4a4kv4-dynamic-gptq.jsonl --json results/g16/w4a4kv4-dynamic-gptq.json
