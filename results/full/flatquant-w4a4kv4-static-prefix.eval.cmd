+ .venv/bin/prefixquant eval --model runs/models/flatquant-w4a4kv4-static-prefix --eval-log results/full/flatquant-w4a4kv4-static-prefix.jsonl --json results/full/flatquant-w4a4kv4-static-prefix.json
