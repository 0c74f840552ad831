+ .venv/bin/prefixquant eval --model runs/models/quarot-w4a4kv4 --eval-log runs/full/quarot-w4a4kv4.jsonl --json runs/full/quarot-w4a4kv4.json
