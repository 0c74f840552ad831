+ .venv/bin/prefixquant lm-eval --model runs/models/w4a4kv4-static-ft --tasks lambada_wikitext2 --json results/lm_eval/w4a4kv4-static-ft.json
