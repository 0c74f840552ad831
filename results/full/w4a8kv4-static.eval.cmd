+ .venv/bin/prefixquant eval --model runs/models/w4a8kv4-static --eval-log runs/full/w4a8kv4-static.jsonl --json runs/full/w4a8kv4-static.json
