+ .venv/bin/prefixquant eval --model runs/models/w4a8kv4-static-gptq-ft --eval-log results/full/w4a8kv4-static-gptq-ft.jsonl --json results/full/w4a8kv4-static-gptq-ft.json
