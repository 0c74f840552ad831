+ .venv/bin/prefixquant eval --model runs/g16/w4a8kv4-static --max-windows 16 --eval-log results/g16/w4a8kv4-static.jsonl --json results/g16/w4a8kv4-static.json
