+ .venv/bin/prefixquant lm-eval --model smollm2 --tasks lambada_wikitext2 --json results/lm_eval/fp.json
