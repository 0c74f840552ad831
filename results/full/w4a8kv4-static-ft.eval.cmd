+ .venv/bin/prefixquant eval --model runs/models/w4a8kv4-static-ft --eval-log results/full/w4a8kv4-static-ft.jsonl --json results/full/w4a8kv4-static-ft.json
