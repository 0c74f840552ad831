+ .venv/bin/prefixquant eval --model runs/m16/flatquant-w4a4kv4-hadamard --max-windows 16 --eval-log results/m16/flatquant-w4a4kv4-hadamard.jsonl --json results/m16/flatquant-w4a4kv4-hadamard.json
