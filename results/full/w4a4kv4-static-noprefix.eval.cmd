+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-static-noprefix --eval-log runs/full/w4a4kv4-static-noprefix.jsonl --json runs/full/w4a4kv4-static-noprefix.json
