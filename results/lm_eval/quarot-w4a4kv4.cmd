+ .venv/bin/prefixquant lm-eval --model runs/models/quarot-w4a4kv4 --tasks lambada_wikitext2 --json results/lm_eval/quarot-w4a4kv4.json
