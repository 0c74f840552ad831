+ .venv/bin/prefixquant lm-eval --model runs/models/w8a8kv8-static --tasks lambada_wikitext2 --json results/lm_eval/w8a8kv8-static.json
