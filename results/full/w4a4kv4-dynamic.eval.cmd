+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-dynamic --eval-log runs/full/w4a4kv4-dynamic.jsonl --json runs/full/w4a4kv4-dynamic.json
