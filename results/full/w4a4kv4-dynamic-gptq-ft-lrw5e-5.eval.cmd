+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-dynamic-gptq-ft-lrw5e-5 --eval-log results/full/w4a4kv4-dynamic-gptq-ft-lrw5e-5.jsonl --json results/full/w4a4kv4-dynamic-gptq-ft-lrw5e-5.json
