"""Hugging Face checkpoints: `config.json` + `*.safetensors` (sharded or not) or `pytorch_model*.bin`.

Import returns (HF config dict, params) with params in prefixquant_jax's layout (see prefixquant_jax/nn/decoder.py:
kernels [in, out], layers by index); `export_hf` writes such params back as `config.json` + `model.safetensors`
that transformers loads. What the tensor names and shapes must be follows from the config dict alone (`Layout`):
the converter knows the HF Llama-family layout, not the model code.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile

import numpy as np

from checkpoints_convert.errors import FormatError, cannot_write, describe
from checkpoints_convert.lazy import LazyLayers

# HF model_type of the families whose tensors this converter maps (Qwen2: q/k/v biases, Qwen3: q/k norms)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_LAYER_KEYS = {
    "input_layernorm.weight": ("input_norm",),
    "post_attention_layernorm.weight": ("post_norm",),
    "self_attn.q_proj.weight": ("attn", "q"),
    "self_attn.k_proj.weight": ("attn", "k"),
    "self_attn.v_proj.weight": ("attn", "v"),
    "self_attn.o_proj.weight": ("attn", "o"),
    "mlp.gate_proj.weight": ("mlp", "gate"),
    "mlp.up_proj.weight": ("mlp", "up"),
    "mlp.down_proj.weight": ("mlp", "down"),
    "self_attn.q_proj.bias": ("attn", "q_bias"),  # Qwen2
    "self_attn.k_proj.bias": ("attn", "k_bias"),
    "self_attn.v_proj.bias": ("attn", "v_bias"),
    "self_attn.q_norm.weight": ("attn", "q_norm"),  # Qwen3
    "self_attn.k_norm.weight": ("attn", "k_norm"),
}
_FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")  # ml_dtypes' bfloat16 is no np.floating subtype
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The sizes and per-family extras that a Llama-family checkpoint's tensor names and shapes follow from."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: biases on q, k, v (never on o)
    qk_norm: bool  # Qwen3: per-head RMSNorm weights [head_dim] on q and k

    @classmethod
    def from_hf_dict(cls, d: dict, source: str) -> "Layout":
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            archs = ", ".join(d.get("architectures") or []) or "no architectures"
            raise FormatError(f"{source}: model_type {model_type!r} ({archs}) is not a Llama-architecture model "
                              f"(supported model_type: {', '.join(MODEL_TYPES)})")
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            return cls(model_type=model_type, vocab_size=int(d["vocab_size"]), hidden_size=hidden,
                       intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
                       num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
                       head_dim=int(d.get("head_dim") or hidden // heads),
                       tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                       qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")
        except KeyError as e:
            raise FormatError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise FormatError(f"{source}: bad model sizes ({describe(e)})") from None


def expected_shapes(hf_config: dict, source: str = "config") -> dict:
    """Shapes of our params (kernels are [in, out]) for the model `hf_config` describes."""
    c = Layout.from_hf_dict(hf_config, source)
    D, F, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = {"input_norm": (D,), "post_norm": (D,),
             "attn": {"q": (D, q), "k": (D, kv), "v": (D, kv), "o": (q, D)},
             "mlp": {"gate": (D, F), "up": (D, F), "down": (F, D)}}
    if c.qkv_bias:
        layer["attn"].update(q_bias=(q,), k_bias=(kv,), v_bias=(kv,))
    if c.qk_norm:
        layer["attn"].update(q_norm=(c.head_dim,), k_norm=(c.head_dim,))
    shapes = {"embed": (c.vocab_size, D), "final_norm": (D,), "layers": {i: layer for i in range(c.num_layers)}}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (D, c.vocab_size)
    return shapes


def check_shapes(params: dict, hf_config: dict, source: str) -> None:
    """FormatError naming the first missing or unexpected tensor or shape mismatch (params in our layout)."""
    model_type = hf_config.get("model_type")

    def walk(exp, got, path):
        if isinstance(exp, dict):
            for k, e in exp.items():
                if not isinstance(got, dict) or k not in got:
                    raise FormatError(f"{source}: missing tensor {'.'.join(map(str, path + (k,)))}")
                walk(e, got[k], path + (k,))
            extra = sorted(set(got) - set(exp), key=str)
            if extra:
                raise FormatError(f"{source}: unexpected tensor {'.'.join(map(str, path + (extra[0],)))} "
                                  f"(model_type {model_type!r} has no such parameter)")
        elif tuple(np.shape(got)) != tuple(exp):
            raise FormatError(f"{source}: shape mismatch for {'.'.join(map(str, path))}: got {tuple(np.shape(got))}, "
                              f"config says {tuple(exp)}")
    walk(expected_shapes(hf_config, source), params, ())


def _convert(t, keep_dtype: bool):
    a = np.asarray(t)
    if a.dtype != np.float32 and not (keep_dtype and a.dtype.name in _FLOAT_DTYPES):
        a = a.astype(np.float32)
    return a


def _where(name: str, c: Layout, source: str):
    """Where HF tensor `name` goes: ("outer", key), ("layer", i, path), or None (skipped); FormatError if unknown."""
    if name == "model.embed_tokens.weight":
        return ("outer", "embed")
    if name == "model.norm.weight":
        return ("outer", "final_norm")
    if name == "lm_head.weight":
        return None if c.tie_word_embeddings else ("outer", "lm_head")
    if (m := _LAYER_RE.match(name)) and m.group(2) in _LAYER_KEYS:
        i = int(m.group(1))
        if i >= c.num_layers:
            raise FormatError(f"{source}: tensor {name} is beyond num_hidden_layers={c.num_layers}")
        return ("layer", i, _LAYER_KEYS[m.group(2)])
    if name.endswith("rotary_emb.inv_freq"):
        return None  # derived from the config
    raise FormatError(f"{source}: unexpected tensor {name!r} (o/MLP biases and non-Llama layers are not supported)")


def _put(params: dict, where, a) -> None:
    """Store tensor `a` (HF layout: weights [out, in]) at `where` (_where) in our layout ([in, out] kernels)."""
    if where[0] == "outer":
        params[where[1]] = a.T if where[1] == "lm_head" else a
        return
    _, i, path = where
    lp = params["layers"][i]
    if len(path) == 1:
        lp[path[0]] = a
    else:
        lp[path[0]][path[1]] = a.T if a.ndim == 2 else a


def _empty_layers(n: int) -> dict:
    return {"layers": {i: {"attn": {}, "mlp": {}} for i in range(n)}}


def hf_state_to_params(state, hf_config: dict, source: str, keep_dtype: bool = False) -> dict:
    """Map HF tensor names ([out, in] weights) to our params ([in, out] kernels), float32.

    `state`: a dict, or an iterable of (name, tensor) pairs consumed one at a time (a stream: only the params
    and one tensor are held). keep_dtype: floating tensors keep their checkpoint dtype (bf16 as ml_dtypes
    numpy, half the host memory of float32) instead of float32."""
    layout = Layout.from_hf_dict(hf_config, source)
    params = _empty_layers(layout.num_layers)
    for name, t in (state.items() if isinstance(state, dict) else state):
        where = _where(name, layout, source)
        if where is not None:
            _put(params, where, _convert(t, keep_dtype))
    check_shapes(params, hf_config, source)
    return params


class ShapeOnly:
    """A tensor's shape only, to check names and shapes (check_shapes reads np.shape) before reading any data."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    @property
    def T(self):
        return ShapeOnly(self.shape[::-1])

    @property
    def ndim(self):
        return len(self.shape)


def lazy_safetensors_params(files: list[str], hf_config: dict, source: str, keep_dtype: bool = False) -> dict:
    """The params of safetensors `files` with the layers read on demand (checkpoints_convert.lazy.LazyLayers):
    embeddings, final norm and head are read now; layer i is read (memory-mapped, tensor by tensor, the file
    closed after) each time params["layers"][i] is asked for, converted as hf_state_to_params does. Names and
    shapes are checked now, from the headers."""
    from safetensors import safe_open

    layout = Layout.from_hf_dict(hf_config, source)
    outer, by_layer = {}, {i: {} for i in range(layout.num_layers)}  # layer -> file -> [(name, where)]
    shapes = _empty_layers(layout.num_layers)
    for f in files:
        try:
            with safe_open(f, framework="numpy") as st:
                entries = [(k, st.get_slice(k).get_shape()) for k in st.keys()]
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise FormatError(f"{f}: cannot read safetensors file ({describe(e)})") from None
        for name, shape in entries:
            where = _where(name, layout, source)
            if where is None:
                continue
            if where[0] == "outer":
                outer[name] = (f, where)
            else:
                by_layer[where[1]].setdefault(f, []).append((name, where))
            _put(shapes, where, ShapeOnly(shape))
    for name, (f, where) in outer.items():
        [a] = _read_tensors(f, [name], keep_dtype)
        _put(shapes, where, a)
    check_shapes(shapes, hf_config, source)

    def load(i: int) -> dict:
        params = {"layers": {i: {"attn": {}, "mlp": {}}}}
        for f, items in by_layer[i].items():
            for (_, where), a in zip(items, _read_tensors(f, [n for n, _ in items], keep_dtype)):
                _put(params, where, a)
        return params["layers"][i]

    params = {k: v for k, v in shapes.items() if k != "layers"}
    params["layers"] = LazyLayers(layout.num_layers, load)
    return params


def _read_tensors(f: str, names, keep_dtype: bool):
    """Yield the tensors `names` of safetensors file f, converted (_convert); the file is closed after the last."""
    from safetensors import safe_open

    try:
        st = safe_open(f, framework="numpy")
    except Exception as e:
        raise FormatError(f"{f}: cannot read safetensors file ({describe(e)})") from None
    with st:
        for name in names:
            try:
                t = st.get_tensor(name)
            except Exception as e:
                raise FormatError(f"{f}: cannot read tensor {name!r} ({describe(e)})") from None
            yield _convert(t, keep_dtype)


def read_config(directory: str) -> dict:
    """The `config.json` of a Hugging Face model directory, as a dict (not checked beyond being a JSON object)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FormatError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def _read_safetensors(files: list[str]):
    """Yield (name, numpy tensor in the checkpoint's dtype) one tensor at a time, file by file.

    `safe_open` memory-maps each file and reads only the tensor asked for (its numpy backend gives bf16 as
    ml_dtypes.bfloat16), so the caller holds one tensor beyond what it keeps, never a copy of the checkpoint."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(f, framework="numpy") as st:
                names = list(st.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise FormatError(f"{f}: cannot read safetensors file ({describe(e)})") from None
        with safe_open(f, framework="numpy") as st:
            for k in names:
                try:
                    t = st.get_tensor(k)
                except Exception as e:
                    raise FormatError(f"{f}: cannot read tensor {k!r} ({describe(e)})") from None
                yield k, t


def _read_torch_bins(files: list[str]) -> dict:
    try:
        import torch
    except ImportError:
        raise FormatError(f"{files[0]}: reading pytorch_model.bin needs torch (pip install torch)") from None
    state = {}
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)  # never plain pickle
        except Exception as e:
            raise FormatError(f"{f}: cannot read torch checkpoint ({describe(e)})") from None
        if not isinstance(sd, dict):
            raise FormatError(f"{f}: expected a state dict, found {type(sd).__name__}")
        state.update({k: v.float().numpy() for k, v in sd.items()})
    return state


def load_hf_dir(directory: str, keep_dtype: bool = False, check_config=None) -> tuple[dict, dict]:
    """(HF config dict, params): float32, or with keep_dtype safetensors tensors in their checkpoint dtype
    (hf_state_to_params); safetensors layers are read when asked for (lazy_safetensors_params: the host holds
    embeddings and head, not the model), torch .bin files whole. check_config(hf_config, source), when given,
    runs before any tensor is read: the caller's own config checks explain a bad config better than a shape check."""
    config, config_path = read_config(directory), os.path.join(directory, "config.json")
    if check_config is not None:
        check_config(config, config_path)
    Layout.from_hf_dict(config, config_path)  # a config error names config.json, not a weights file
    st = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if st:
        source = st[0] if len(st) == 1 else os.path.join(directory, "*.safetensors")
        return config, lazy_safetensors_params(st, config, source, keep_dtype=keep_dtype)
    if not bins:
        raise FormatError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
    source = bins[0] if len(bins) == 1 else os.path.join(directory, "pytorch_model*.bin")
    return config, hf_state_to_params(_read_torch_bins(bins), config, source)


def params_to_hf_state(params: dict, hf_config: dict) -> dict:
    """Inverse of `hf_state_to_params`: HF names, [out, in] weights, float32 contiguous arrays."""
    layout = Layout.from_hf_dict(hf_config, "hf_config")
    state = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if not layout.tie_word_embeddings:
        state["lm_head.weight"] = np.asarray(params["lm_head"]).T
    for i in range(layout.num_layers):
        p = params["layers"][i]
        for hf_name, path in _LAYER_KEYS.items():
            if len(path) == 2 and path[1] not in p[path[0]]:
                continue  # a bias or q/k norm of another family
            a = p[path[0]] if len(path) == 1 else np.asarray(p[path[0]][path[1]])
            state[f"model.layers.{i}.{hf_name}"] = a.T if a.ndim == 2 else a
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in state.items()}


def export_hf(params: dict, hf_config: dict, out_dir: str, overwrite: bool = False) -> str:
    """Write `hf_config` as config.json and `params` (our layout) as model.safetensors, float32, atomically (a
    temp dir, then a rename). Returns out_dir."""
    from safetensors.numpy import save_file

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FormatError(f"{out_dir} already exists (pass --overwrite to replace it)")
    state = params_to_hf_state(params, hf_config)  # a bad config or params fail before anything is written
    parent = os.path.dirname(out_dir)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if os.path.exists(out_dir):  # the old export moves aside only once the new one is complete
            old = tmp + "-previous"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except Exception as e:  # a full disk or a read-only target (safetensors raises its own error type)
        raise cannot_write(out_dir, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
