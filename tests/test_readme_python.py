"""README "Use it from Python": the snippet, exactly as written there, on the tiny model (only MODEL changes),
plus what it shows: finite gradients for the scales only, the weight's QArray, the real backend near the
fake one, and a bit-identical reload."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    text = README.read_text()
    m = re.search(r"<!-- python-snippet -->\n```python\n(.*?)```", text, re.S)
    assert m, "README has no python snippet"
    return m.group(1)


def test_readme_python_snippet_runs_on_the_tiny_model(tiny_dir):
    code = snippet()
    assert 'MODEL = "smollm2"' in code
    ns = {}
    exec(compile(code.replace('MODEL = "smollm2"', f"MODEL = {str(tiny_dir)!r}", 1), "README.md", "exec"), ns)
    import jax

    qm, grads, qa = ns["qm"], ns["grads"], ns["qa"]
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert any(np.any(np.asarray(g) != 0) for g in leaves)  # the static scales do get a gradient
    assert qa.bits == 4 and qa.qvalue.dtype == np.int8
    np.testing.assert_array_equal(np.asarray(qa.dequantize()),
                                  np.asarray(qm.model.layers[0].recipe.apply_weight(
                                      "q", qm.model.layers[0].attn.q.kernel[...], qm.model.layers[0].qparams)))
    fake, real = np.asarray(ns["logits"]), np.asarray(ns["real_logits"])
    assert real.shape == fake.shape and np.all(np.isfinite(real))
    assert np.corrcoef(real.ravel(), fake.ravel())[0, 1] > 0.99  # same quantizers, integer arithmetic
