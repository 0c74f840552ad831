+ .venv/bin/prefixquant eval --model runs/models/flatquant-w4a4kv4 --eval-log results/full/flatquant-w4a4kv4.jsonl --json results/full/flatquant-w4a4kv4.json
