+ .venv/bin/prefixquant eval --model runs/g16/quarot-w4a4kv4 --max-windows 16 --eval-log results/g16/quarot-w4a4kv4.jsonl --json results/g16/quarot-w4a4kv4.json
