+ .venv/bin/prefixquant eval --model smollm2 --eval-log runs/full/fp.jsonl --json runs/full/fp.json
