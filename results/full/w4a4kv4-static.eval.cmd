+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-static --eval-log runs/full/w4a4kv4-static.jsonl --json runs/full/w4a4kv4-static.json
