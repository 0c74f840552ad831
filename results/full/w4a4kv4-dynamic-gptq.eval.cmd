+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-dynamic-gptq --eval-log results/full/w4a4kv4-dynamic-gptq.jsonl --json results/full/w4a4kv4-dynamic-gptq.json
