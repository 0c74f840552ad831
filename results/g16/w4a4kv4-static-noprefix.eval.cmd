+ .venv/bin/prefixquant eval --model runs/g16/w4a4kv4-static-noprefix --max-windows 16 --eval-log results/g16/w4a4kv4-static-noprefix.jsonl --json results/g16/w4a4kv4-static-noprefix.json
