"""SmolLM2 from the bundled GGUF vs transformers fp32 (same GGUF, `gguf_file=`): ppl and greedy tokens."""
import math
import os

import pytest
import torch

from prefixquant_jax.eval.data import load_text, tokenize, windows
from prefixquant_jax.eval.generate import greedy
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.nn.decoder import Decoder
from tests.conftest import needs_smollm2

pytestmark = [needs_smollm2, pytest.mark.smollm2]


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    ck, _ = smollm2
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(ck.path), gguf_file=os.path.basename(ck.path),
                                                torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(smollm2):
    ck, _ = smollm2
    return Decoder(ck.config, ck.params)


@pytest.mark.slow  # ~2 min of CPU eval; logits and greedy parity stay in the default run
def test_ppl_two_windows_matches_transformers(smollm2, hf_model, model):
    _, tok = smollm2
    win = windows(tokenize(tok, load_text("wikitext2")), 2048, max_windows=2)
    ours = perplexity(model, win, progress=False)["ppl"]
    nll = 0.0
    with torch.no_grad():
        for w in win:
            t = torch.tensor(w[None], dtype=torch.long)
            logits = hf_model(t).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum").item()
    ref = math.exp(nll / (len(win) * (win.shape[1] - 1)))
    assert abs(ours - ref) / ref < 1e-3, (ours, ref)


def test_greedy_32_tokens_match_transformers(smollm2, hf_model, model):
    """Our 32 greedy tokens (KV cache, decode steps) are transformers' greedy tokens. Checked teacher-forced in
    one transformers forward over the prompt and our tokens: its argmax after each prefix is our next token, so
    its own greedy decoding (token by token, each step's input the previous argmax) gives the same 32 tokens."""
    _, tok = smollm2
    ids = tok("The capital of France is Paris. The capital of Germany is").input_ids
    ours = greedy(model, ids, 32, eos_id=None)
    assert len(ours) == 32
    with torch.no_grad():
        logits = hf_model(torch.tensor([list(ids) + ours[:-1]])).logits[0]
    ref = logits[len(ids) - 1:].argmax(-1).tolist()
    assert ours == ref, (tok.decode(ours), tok.decode(ref))
