"""Hugging Face checkpoints: `config.json` + `*.safetensors` (sharded or not) or `pytorch_model*.bin`.

Import returns (ModelConfig, params) in the layout of `prefixquant_jax.model`; `export_hf` writes the
same params back as `config.json` + `model.safetensors` that transformers loads.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile

import numpy as np

from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.errors import UserError, describe

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
    "self_attn.q_proj.bias": ("attn", "q_bias"),  # Qwen2 (config.attention_bias)
    "self_attn.k_proj.bias": ("attn", "k_bias"),
    "self_attn.v_proj.bias": ("attn", "v_bias"),
    "self_attn.q_norm.weight": ("attn", "q_norm"),  # Qwen3 (config.qk_norm)
    "self_attn.k_norm.weight": ("attn", "k_norm"),
}
_FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")  # ml_dtypes' bfloat16 is no np.floating subtype
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def expected_shapes(c: ModelConfig) -> dict:
    """Shapes of our params (kernels are [in, out])."""
    D, F, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = {"input_norm": (D,), "post_norm": (D,),
             "attn": {"q": (D, q), "k": (D, kv), "v": (D, kv), "o": (q, D)},
             "mlp": {"gate": (D, F), "up": (D, F), "down": (F, D)}}
    if c.attention_bias:
        layer["attn"].update(q_bias=(q,), k_bias=(kv,), v_bias=(kv,))
    if c.qk_norm:
        layer["attn"].update(q_norm=(c.head_dim,), k_norm=(c.head_dim,))
    shapes = {"embed": (c.vocab_size, D), "final_norm": (D,), "layers": {i: layer for i in range(c.num_layers)}}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (D, c.vocab_size)
    return shapes


def check_shapes(params: dict, config: ModelConfig, source: str) -> None:
    """Raise UserError naming the first missing or unexpected tensor or shape mismatch."""
    def walk(exp, got, path):
        if isinstance(exp, dict):
            for k, e in exp.items():
                if not isinstance(got, dict) or k not in got:
                    raise UserError(f"{source}: missing tensor {'.'.join(map(str, path + (k,)))}")
                walk(e, got[k], path + (k,))
            extra = sorted(set(got) - set(exp), key=str)
            if extra:
                raise UserError(f"{source}: unexpected tensor {'.'.join(map(str, path + (extra[0],)))} "
                                f"(model_type {config.model_type!r} has no such parameter)")
        elif tuple(np.shape(got)) != tuple(exp):
            raise UserError(f"{source}: shape mismatch for {'.'.join(map(str, path))}: got {tuple(np.shape(got))}, config says {tuple(exp)}")
    walk(expected_shapes(config), params, ())


def _convert(t, keep_dtype: bool):
    a = np.asarray(t)
    if a.dtype != np.float32 and not (keep_dtype and a.dtype.name in _FLOAT_DTYPES):
        a = a.astype(np.float32)
    return a


def _where(name: str, config: ModelConfig, source: str):
    """Where HF tensor `name` goes: ("outer", key), ("layer", i, path), or None (skipped); UserError if unknown."""
    if name == "model.embed_tokens.weight":
        return ("outer", "embed")
    if name == "model.norm.weight":
        return ("outer", "final_norm")
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else ("outer", "lm_head")
    if (m := _LAYER_RE.match(name)) and m.group(2) in _LAYER_KEYS:
        i = int(m.group(1))
        if i >= config.num_layers:
            raise UserError(f"{source}: tensor {name} is beyond num_hidden_layers={config.num_layers}")
        return ("layer", i, _LAYER_KEYS[m.group(2)])
    if name.endswith("rotary_emb.inv_freq"):
        return None  # derived from the config
    raise UserError(f"{source}: unexpected tensor {name!r} (o/MLP biases and non-Llama layers are not supported)")


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


def hf_state_to_params(state, config: ModelConfig, source: str, keep_dtype: bool = False) -> dict:
    """Map HF tensor names ([out, in] weights) to our params ([in, out] kernels), float32.

    `state`: a dict, or an iterable of (name, tensor) pairs consumed one at a time (a stream: only the params
    and one tensor are held). keep_dtype: floating tensors keep their checkpoint dtype (bf16 as ml_dtypes
    numpy, half the host memory of float32) instead of float32."""
    params: dict = {"layers": {i: {"attn": {}, "mlp": {}} for i in range(config.num_layers)}}
    for name, t in (state.items() if isinstance(state, dict) else state):
        where = _where(name, config, source)
        if where is not None:
            _put(params, where, _convert(t, keep_dtype))
    check_shapes(params, config, source)
    return params


class _Shape:
    """A tensor's shape only (check_shapes reads np.shape)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    @property
    def T(self):
        return _Shape(self.shape[::-1])

    @property
    def ndim(self):
        return len(self.shape)


def lazy_safetensors_params(files: list[str], config: ModelConfig, source: str, keep_dtype: bool = False) -> dict:
    """The params of safetensors `files` with the layers read on demand (checkpoints_convert.lazy.LazyLayers):
    embeddings, final norm and head are read now; layer i is read (memory-mapped, tensor by tensor, the file
    closed after) each time params["layers"][i] is asked for, converted as hf_state_to_params does. Names and
    shapes are checked now, from the headers."""
    from safetensors import safe_open

    from checkpoints_convert.lazy import LazyLayers

    outer, by_layer = {}, {i: {} for i in range(config.num_layers)}  # layer -> file -> [(name, where)]
    shapes: dict = {"layers": {i: {"attn": {}, "mlp": {}} for i in range(config.num_layers)}}
    for f in files:
        try:
            with safe_open(f, framework="numpy") as st:
                entries = [(k, st.get_slice(k).get_shape()) for k in st.keys()]
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise UserError(f"{f}: cannot read safetensors file ({describe(e)})") from None
        for name, shape in entries:
            where = _where(name, config, source)
            if where is None:
                continue
            if where[0] == "outer":
                outer[name] = (f, where)
            else:
                by_layer[where[1]].setdefault(f, []).append((name, where))
            _put(shapes, where, _Shape(shape))
    for name, (f, where) in outer.items():
        [a] = _read_tensors(f, [name], keep_dtype)
        _put(shapes, where, a)
    check_shapes(shapes, config, source)

    def load(i: int) -> dict:
        params = {"layers": {i: {"attn": {}, "mlp": {}}}}
        for f, items in by_layer[i].items():
            for (_, where), a in zip(items, _read_tensors(f, [n for n, _ in items], keep_dtype)):
                _put(params, where, a)
        return params["layers"][i]

    params = {k: v for k, v in shapes.items() if k != "layers"}
    params["layers"] = LazyLayers(config.num_layers, load)
    return params


def _read_tensors(f: str, names, keep_dtype: bool):
    """Yield the tensors `names` of safetensors file f, converted (_convert); the file is closed after the last."""
    from safetensors import safe_open

    try:
        st = safe_open(f, framework="numpy")
    except Exception as e:
        raise UserError(f"{f}: cannot read safetensors file ({describe(e)})") from None
    with st:
        for name in names:
            try:
                t = st.get_tensor(name)
            except Exception as e:
                raise UserError(f"{f}: cannot read tensor {name!r} ({describe(e)})") from None
            yield _convert(t, keep_dtype)


def read_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf_dict(d, source=path)


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
            raise UserError(f"{f}: cannot read safetensors file ({describe(e)})") from None
        with safe_open(f, framework="numpy") as st:
            for k in names:
                try:
                    t = st.get_tensor(k)
                except Exception as e:
                    raise UserError(f"{f}: cannot read tensor {k!r} ({describe(e)})") from None
                yield k, t


def _read_torch_bins(files: list[str]) -> dict:
    try:
        import torch
    except ImportError:
        raise UserError(f"{files[0]}: reading pytorch_model.bin needs torch (pip install torch)") from None
    state = {}
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)  # never plain pickle
        except Exception as e:
            raise UserError(f"{f}: cannot read torch checkpoint ({describe(e)})") from None
        if not isinstance(sd, dict):
            raise UserError(f"{f}: expected a state dict, found {type(sd).__name__}")
        state.update({k: v.float().numpy() for k, v in sd.items()})
    return state


def load_hf_dir(directory: str, keep_dtype: bool = False) -> tuple[ModelConfig, dict]:
    """(config, params): float32, or with keep_dtype safetensors tensors in their checkpoint dtype
    (hf_state_to_params); safetensors layers are read when asked for (lazy_safetensors_params: the host holds
    embeddings and head, not the model), torch .bin files whole."""
    config = read_config(directory)
    st = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if st:
        source = st[0] if len(st) == 1 else os.path.join(directory, "*.safetensors")
        return config, lazy_safetensors_params(st, config, source, keep_dtype=keep_dtype)
    if bins:
        state = _read_torch_bins(bins)
        source = bins[0] if len(bins) == 1 else os.path.join(directory, "pytorch_model*.bin")
    else:
        raise UserError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
    return config, hf_state_to_params(state, config, source, keep_dtype=keep_dtype and bool(st))


def params_to_hf_state(params: dict, config: ModelConfig) -> dict:
    """Inverse of `hf_state_to_params`: HF names, [out, in] weights, float32 contiguous arrays."""
    state = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = np.asarray(params["lm_head"]).T
    for i in range(config.num_layers):
        p = params["layers"][i]
        for hf_name, path in _LAYER_KEYS.items():
            if len(path) == 2 and path[1] not in p[path[0]]:
                continue  # a bias or q/k norm of another family
            a = p[path[0]] if len(path) == 1 else np.asarray(p[path[0]][path[1]])
            state[f"model.layers.{i}.{hf_name}"] = a.T if a.ndim == 2 else a
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in state.items()}


def export_hf(params: dict, config: ModelConfig, out_dir: str, overwrite: bool = False, extra_config: dict | None = None) -> str:
    """Write config.json + model.safetensors atomically (temp dir, then rename). Returns out_dir."""
    from safetensors.numpy import save_file

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise UserError(f"{out_dir} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        cfg = config.to_hf_dict()
        cfg.update(extra_config or {})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(params_to_hf_state(params, config), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_rotated_hf(params: dict, config: ModelConfig, out_dir: str, seed: int = 0, overwrite: bool = False) -> str:
    """Fold norms and fuse R1/R2 (the offline rotations), then export as a plain HF Llama.

    R3 (Q/K after RoPE) and R4 (down_proj input) need an online Hadamard that a stock
    transformers Llama cannot run, so they are not applied here; the exported model computes the
    same function as the original. The rotation is recorded in config.json under `prefixquant`.
    """
    from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params

    rot = RotationConfig(r1=True, r2=True, r3=False, r4=False, seed=seed)
    rparams, rconfig = rotate_params(params, config, rot)
    note = {"prefixquant": {"rotation": "norms folded, R1 and R2 random Hadamard fused", "seed": seed,
                            "online_not_representable": ["R3 (Q/K after RoPE)", "R4 (down_proj input)"]}}
    return export_hf(rparams, rconfig, out_dir, overwrite=overwrite, extra_config=note)
