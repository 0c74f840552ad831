+ .venv/bin/prefixquant eval --model runs/g16/w4a4kv4-dynamic --max-windows 16 --eval-log results/g16/w4a4kv4-dynamic.jsonl --json results/g16/w4a4kv4-dynamic.json
