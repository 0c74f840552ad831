"""GGUF layers dequantized when asked for (gguf_io.read_gguf, lazy by default): the same params as the eager read,
and only the asked layer's tensors are dequantized (counted through gguf.quants.dequantize)."""
import numpy as np
import pytest

from checkpoints_convert import FormatError, read_checkpoint
from checkpoints_convert.gguf_io import read_gguf
from checkpoints_convert.lazy import LazyLayers, materialize
from tests.checkpoints_convert.test_gguf import write_gguf
from tests.conftest import make_tiny_hf, needs_smollm2, smollm2_path


@pytest.fixture
def count_dequantize(monkeypatch):
    import gguf

    calls = []
    real = gguf.quants.dequantize

    def counting(data, qtype):
        calls.append(qtype.name)
        return real(data, qtype)
    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    return calls


def _assert_same(lazy: dict, eager: dict, layers):
    assert {k for k in lazy if k != "layers"} == {k for k in eager if k != "layers"}
    for k in eager:
        if k != "layers":
            np.testing.assert_array_equal(lazy[k], eager[k], err_msg=k)
    for i in layers:
        a, b = materialize(lazy["layers"][i]), eager["layers"][i]
        assert a.keys() == b.keys() and a["attn"].keys() == b["attn"].keys() and a["mlp"].keys() == b["mlp"].keys()
        for group in ("attn", "mlp"):
            for n in b[group]:
                assert a[group][n].dtype == np.float32
                np.testing.assert_array_equal(a[group][n], b[group][n], err_msg=f"{i}.{group}.{n}")
        for n in (k for k in b if k not in ("attn", "mlp")):
            np.testing.assert_array_equal(a[n], b[n], err_msg=f"{i}.{n}")


def test_tiny_gguf_lazy_equals_eager_and_reads_one_layer(tmp_path, count_dequantize):
    write_gguf(tmp_path / "tiny.gguf", make_tiny_hf(tmp_path / "hf", tied=False, tokenizer=False))
    config, eager = read_gguf(str(tmp_path / "tiny.gguf"), lazy=False)
    n = config["num_hidden_layers"]
    assert isinstance(eager["layers"], dict) and len(count_dequantize) == 3 + 9 * n
    del count_dequantize[:]
    config2, lazy = read_gguf(str(tmp_path / "tiny.gguf"))
    assert config2 == config and isinstance(lazy["layers"], LazyLayers)
    assert len(count_dequantize) == 3  # embeddings, final norm, head: no layer yet
    lazy["layers"][1]
    assert len(count_dequantize) == 3 + 9  # layer 1's nine tensors (norms, q k v o, gate up down)
    _assert_same(lazy, eager, range(n))
    raw = read_checkpoint(str(tmp_path / "tiny.gguf"))  # the reader's default
    assert isinstance(raw.params["layers"], LazyLayers)


def test_lazy_gguf_checks_names_before_reading(tmp_path, count_dequantize):
    write_gguf(tmp_path / "bad.gguf", make_tiny_hf(tmp_path / "hf", tokenizer=False), skip=("blk.1.ffn_down.weight",))
    with pytest.raises(FormatError, match="missing tensor blk.1.ffn_down.weight"):
        read_gguf(str(tmp_path / "bad.gguf"))
    assert len(count_dequantize) == 0  # found from the tensor infos, before any tensor is dequantized


@needs_smollm2
def test_smollm2_gguf_lazy_equals_eager(count_dequantize):
    """The bundled Q4_1 SmolLM2: quantized blocks dequantized per layer give the eager read's arrays."""
    path = smollm2_path()
    config, lazy = read_gguf(path)
    outer = len(count_dequantize)
    assert outer <= 3
    n = config["num_hidden_layers"]
    for i in (0, n - 1):
        lazy["layers"][i]
    assert len(count_dequantize) == outer + 2 * 9
    assert "Q4_1" in count_dequantize
    _, eager = read_gguf(path, lazy=False)
    _assert_same(lazy, eager, (0, n - 1))
