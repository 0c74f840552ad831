+ .venv/bin/prefixquant eval --model runs/models/w8a8kv8-static --eval-log runs/full/w8a8kv8-static.jsonl --json runs/full/w8a8kv8-static.json
