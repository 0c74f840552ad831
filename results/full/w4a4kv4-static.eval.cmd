+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-static --eval-log results/full/w4a4kv4-static.jsonl --json results/full/w4a4kv4-static.json
