+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-dynamic-gptq-ft --eval-log results/full/w4a4kv4-dynamic-gptq-ft.jsonl --json results/full/w4a4kv4-dynamic-gptq-ft.json
