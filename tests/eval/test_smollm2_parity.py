"""SmolLM2 from the bundled GGUF vs transformers fp32 (same GGUF, `gguf_file=`): ppl and greedy tokens."""
import math
import os

import pytest
import torch

from prefixquant_jax.eval.data import load_text, tokenize, windows
from prefixquant_jax.eval.generate import greedy
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.model import Llama
from prefixquant_jax.compiled import Compiled
from tests.conftest import needs_smollm2

pytestmark = [needs_smollm2, pytest.mark.smollm2]


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    ck, _ = smollm2
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(ck.path), gguf_file=os.path.basename(ck.path),
                                                torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def compiled(smollm2):
    ck, _ = smollm2
    return Compiled(Llama.from_params(ck.config, ck.params))


@pytest.mark.slow  # ~2 min of CPU eval; logits and greedy parity stay in the default run
def test_ppl_two_windows_matches_transformers(smollm2, hf_model, compiled):
    _, tok = smollm2
    win = windows(tokenize(tok, load_text("wikitext2")), 2048, max_windows=2)
    ours = perplexity(compiled, win, progress=False)["ppl"]
    nll = 0.0
    with torch.no_grad():
        for w in win:
            t = torch.tensor(w[None], dtype=torch.long)
            logits = hf_model(t).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum").item()
    ref = math.exp(nll / (len(win) * (win.shape[1] - 1)))
    assert abs(ours - ref) / ref < 1e-3, (ours, ref)


def test_greedy_32_tokens_match_transformers(smollm2, hf_model, compiled):
    _, tok = smollm2
    ids = tok("The capital of France is Paris. The capital of Germany is").input_ids
    ours = greedy(compiled, ids, 32, eos_id=None)
    seq = torch.tensor([ids])
    with torch.no_grad():
        out = hf_model(seq, use_cache=True)
        ref = []
        for _ in range(32):
            nxt = out.logits[0, -1].argmax().item()
            ref.append(nxt)
            out = hf_model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    assert ours == ref, (tok.decode(ours), tok.decode(ref))
