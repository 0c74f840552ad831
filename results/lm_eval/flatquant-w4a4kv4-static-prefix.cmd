+ .venv/bin/prefixquant lm-eval --model runs/models/flatquant-w4a4kv4-static-prefix --tasks lambada_wikitext2 --json results/lm_eval/flatquant-w4a4kv4-static-prefix.json
