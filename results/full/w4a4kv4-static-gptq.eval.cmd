+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-static-gptq --eval-log results/full/w4a4kv4-static-gptq.jsonl --json results/full/w4a4kv4-static-gptq.json
