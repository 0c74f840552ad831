"""A (data, model) device mesh for evaluation and the real runtime: jax.sharding, no hand-written collectives.

`MeshSpec.parse("data=2,model=2")` (the CLI's `--mesh`; default: every local device on `data`) names the
mesh; `shard(model, spec)` puts a model's state (any Decoder: fake-quant or packed integer) with `jax.device_put`
on `NamedSharding`s of a `jax.sharding.Mesh`; the evaluations' jitted functions (eval/forward.py) follow their
inputs' shardings and XLA's SPMD partitioner inserts the collectives.

Weights (the usual Megatron split over `model`):
  column split (output features: attention heads, MLP columns)  q, k, v, gate, up kernels [in, out] (the packed
      model's codes [in(/2), out]) and the q/k/v biases
  row split (input features)  o, down kernels [in, out] (packed: [in(/2), out])
  replicated  embeddings, head, norms, quantizer scales (qparams), FlatQuant transforms, the prefix K/V
Batches: tokens [B, L] and KV caches [B, T, KV, .] over `data` (rows; replicated when B % data != 0, e.g.
the 1-row remainder of a perplexity run), caches' KV heads over `model`.

Block-wise calibration and training (`quantize(..., mesh=MeshSpec)`): the block being processed is put on the
mesh with the same rules (`block_shardings`; Adam's moments like their parameters) and the samples' rows over
`data` (pipeline.blocks.BlockRunner, pipeline.train.BlockTrainer); tests/parallel/test_sharding_blocks.py measures them.

A one-device mesh returns the compiled model unchanged: exactly the single-device computation.
Numbers: rows of a batch are independent, so `data` alone does not change them; a row split over `model`
sums each output of o and down as partial sums over devices, a different float summation order (a few
ulps; tests/parallel/test_sharding.py measures it).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefixquant_jax.errors import UserError

AXES = ("data", "model")
COLUMN = ("q", "k", "v", "gate", "up")  # fake-quant Linear names, split by output features
ROW = ("o", "down")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """`data` x `model` devices; data=None: all local devices not used by `model` (the default mesh)."""

    data: int | None = None
    model: int = 1

    def __post_init__(self):
        for name in AXES:
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise UserError(f"mesh axis {name} must be a positive integer, got {v!r}", "MeshSpec." + name)

    @classmethod
    def parse(cls, text: str | None) -> "MeshSpec":
        """'data=D,model=M' (either may be left out); None or '': the default mesh."""
        if not text:
            return cls()
        sizes = {}
        for part in text.split(","):
            name, eq, value = part.strip().partition("=")
            name = name.strip()
            if not eq or name not in AXES:
                raise UserError(f"--mesh {text!r}: expected data=D,model=M (axes {', '.join(AXES)})")
            if name in sizes:
                raise UserError(f"--mesh {text!r}: axis {name} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise UserError(f"--mesh {text!r}: {name}={value.strip()!r} is not an integer") from None
            if sizes[name] < 1:
                raise UserError(f"--mesh {text!r}: {name} must be >= 1")
        return cls(**sizes)

    def resolve(self, n_devices: int) -> tuple[int, int]:
        """(data, model) for `n_devices` local devices."""
        data = self.data if self.data is not None else n_devices // self.model
        if data < 1 or data * self.model > n_devices:
            raise UserError(f"mesh data={self.data if self.data is not None else '(all)'},model={self.model} needs "
                            f"{max(data, 1) * self.model} devices, {n_devices} local device(s) available")
        return data, self.model

    def make(self, devices=None) -> Mesh:
        """The jax.sharding.Mesh over the first data*model of `devices` (default: jax.local_devices())."""
        devices = list(jax.local_devices() if devices is None else devices)
        data, model = self.resolve(len(devices))
        return Mesh(np.array(devices[:data * model], dtype=object).reshape(data, model), AXES)

    def check_model(self, config) -> None:
        """UserError unless `model` divides every width the Megatron split cuts (partition_spec): q and o's heads x
        head_dim, k and v's KV heads x head_dim, the MLP width (gate / up columns, down rows)."""
        m = self.model
        widths = (("q/o", config.num_heads, config.head_dim), ("k/v", config.num_kv_heads, config.head_dim))
        for what, heads, hd in widths:
            if heads * hd % m:
                raise UserError(f"MeshSpec.model={m} does not divide the {what} width {heads * hd} ({heads} heads x "
                                f"{hd}); pick a model size dividing the heads and MLP width", "MeshSpec.model")
        if config.intermediate_size % m:
            raise UserError(f"MeshSpec.model={m} does not divide the MLP width {config.intermediate_size}; pick a "
                            "model size dividing the heads and MLP width", "MeshSpec.model")

    def make_for(self, config, devices=None) -> Mesh:
        """make(devices) for a model of `config`, its widths checked first (check_model)."""
        self.check_model(config)
        return self.make(devices)

    def __str__(self) -> str:
        return f"data={'all' if self.data is None else self.data},model={self.model}"


def _names(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(n for n in out if n != "value")  # nnx Variables end in .value


def partition_spec(names: tuple, ndim: int) -> PartitionSpec:
    """PartitionSpec of one weight leaf from its path names (a Decoder's nnx state: float kernels or packed codes)."""
    if "layers" not in names or len(names) < 3:
        return PartitionSpec()
    owner, leaf = names[-2], names[-1]
    in_block = names[-3] in ("attn", "mlp")
    if in_block and owner in COLUMN and leaf == "kernel" and ndim == 2:
        return PartitionSpec(None, "model")
    if in_block and owner in COLUMN and leaf == "bias" and ndim == 1:
        return PartitionSpec("model")
    if in_block and owner in ROW and leaf == "kernel" and ndim == 2:
        return PartitionSpec("model", None)
    return PartitionSpec()


def _check(names, shape, spec: PartitionSpec, mesh: Mesh):
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
            where = ".".join(str(n) for n in names)
            raise UserError(f"{where} {tuple(shape)} cannot be split over mesh axis {axis}={mesh.shape[axis]}: "
                            f"{dim} is not a multiple (pick --mesh model= dividing the heads and MLP width)")


def state_shardings(mesh: Mesh, state):
    """NamedSharding per leaf of a model state (partition_spec); UserError if a split dimension does not divide."""
    def one(path, leaf):
        names, shape = _names(path), np.shape(leaf)
        spec = partition_spec(names, len(shape))
        _check(names, shape, spec, mesh)
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, state)


def block_shardings(mesh: Mesh, state):
    """NamedSharding per leaf of one decoder block's nnx state (paths attn.q.kernel, mlp.down.kernel, qparams...):
    the rules of partition_spec for that block inside a model (block-wise calibration and training)."""
    def one(path, leaf):
        names, shape = ("layers", 0) + _names(path), np.shape(leaf)
        spec = partition_spec(names, len(shape))
        _check(names, shape, spec, mesh)
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, state)


def params_shardings(mesh: Mesh, params: dict):
    """NamedSharding per leaf of a params dict (model.py layout: layers.i.attn.q, .q_bias, ...), same rules."""
    def one(path, leaf):
        names = _names(path)
        if len(names) == 4 and names[2] in ("attn", "mlp"):  # -> the nnx path of that Linear's kernel / bias
            owner = str(names[3])
            names = names[:3] + ((owner[:-5], "bias") if owner.endswith("_bias") else (owner, "kernel"))
        spec = partition_spec(names, np.ndim(leaf))
        _check(names, np.shape(leaf), spec, mesh)
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, params)


def place_params(params: dict, spec: MeshSpec | None = None, devices=None) -> dict:
    """Host params put straight onto the mesh, each device receiving only its shards (jax.device_put of the
    numpy arrays), so that the model built from them never sits whole on one device; a one-device mesh: the
    params unchanged (the single-device path)."""
    mesh = (spec or MeshSpec()).make(devices)
    if mesh.size == 1:
        return params
    return jax.device_put(params, params_shardings(mesh, params))


def batch_spec(mesh: Mesh, shape) -> PartitionSpec:
    """Rows over `data` (when they divide), a cache's KV heads (axis 2 of a 4-d leaf) over `model` (ditto)."""
    if len(shape) == 0:
        return PartitionSpec()
    rows = "data" if mesh.shape["data"] > 1 and shape[0] % mesh.shape["data"] == 0 else None
    if len(shape) == 4 and mesh.shape["model"] > 1 and shape[2] % mesh.shape["model"] == 0:
        return PartitionSpec(rows, None, "model", None)
    return PartitionSpec(rows)


def batch_shardings(mesh: Mesh, tree):
    return jax.tree.map(lambda a: NamedSharding(mesh, batch_spec(mesh, np.shape(a))), tree)


@dataclasses.dataclass
class Placed:
    """A model and the mesh its state is on (None: one device, the model as it was)."""

    model: object
    mesh: Mesh | None


def shard(model, spec: MeshSpec | None = None, devices=None) -> Placed:
    """`model` (any Decoder) with its state put on the mesh `spec` (default MeshSpec(): every local device on
    `data`), weights split by partition_spec; a one-device mesh (or spec None) returns the model itself."""
    if spec is None:
        return Placed(model, None)
    mesh = spec.make(devices)
    if mesh.size == 1:
        return Placed(model, None)
    graphdef, state = nnx.split(model)
    return Placed(nnx.merge(graphdef, jax.device_put(state, state_shardings(mesh, state))), mesh)


def place_batch(mesh: Mesh | None, tree):
    """Tokens / caches / activations on the mesh (rows over `data`, a cache's KV heads over `model`: batch_spec);
    without a mesh: as they are."""
    if mesh is None:
        return tree
    return jax.device_put(tree, batch_shardings(mesh, tree))
