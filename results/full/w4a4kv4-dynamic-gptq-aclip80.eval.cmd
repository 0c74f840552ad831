+ .venv/bin/prefixquant eval --model runs/models/w4a4kv4-dynamic-gptq-aclip80 --eval-log results/full/w4a4kv4-dynamic-gptq-aclip80.jsonl --json results/full/w4a4kv4-dynamic-gptq-aclip80.json
