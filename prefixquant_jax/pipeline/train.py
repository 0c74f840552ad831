"""Block-wise fine-tuning of whatever parameters a method marks trainable (PrefixQuant, FlatQuant).

For block l: inputs x_q = outputs of the already-trained quantized blocks 0..l-1 on the training
samples, target = FP block l on the FP inputs x_fp (both behind the blocks' FP prefix); loss = MSE; only
block l changes. Activations live on the host (numpy) between blocks; the device holds one block,
its optimizer state and one batch. Every block has the same structure, so the train step compiles
once. By default the batch is sharded over `jax.devices()` (params replicated): the same code runs on one
CPU, several forced host devices, a GPU or several processes. With `mesh` (a (data, model)
jax.sharding.Mesh) the block's parameters and their optimizer state are split over `model`
(parallel.sharding.block_shardings, the Megatron split) and the batch over `data`; XLA inserts the collectives.

Parameter groups are (name, nnx filter, learning rate, projection): PrefixQuant trains QuantParam
(scales, zero points; lr 5e-5, scales kept positive) and the linear kernels (lr 5e-6); AdamW with
weight decay 0 and a cosine decay to lr/10, as in the paper.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import QUERY_CHUNK
from prefixquant_jax.nn.variables import QuantParam, ZeroPoint
from prefixquant_jax.options import TrainConfig
from prefixquant_jax.parallel.sharding import block_shardings
from prefixquant_jax.pipeline.blocks import BlockRunner, block_output

MIN_SCALE = 1e-6


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    name: str
    filter: Any
    lr: float
    project: Callable | None = None  # applied to the group's state after every update


def positive_quant_scales(state):
    """Clamp the quantizer variables of `state` to stay positive, except zero points (ZeroPoint)."""
    def f(v):
        if not isinstance(v, nnx.Variable):
            return jnp.maximum(v, MIN_SCALE)
        return v if isinstance(v, ZeroPoint) else v.replace(jnp.maximum(v[...], MIN_SCALE))
    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def prefixquant_groups(cfg: TrainConfig) -> tuple[ParamGroup, ...]:
    groups = (ParamGroup("quant", QuantParam, cfg.lr_quant, positive_quant_scales),)
    if cfg.train_weights:
        groups += (ParamGroup("weight", nnx.All(nnx.Param, nnx.PathContains("kernel")), cfg.lr_weight),)
    return groups


def _optimizer(groups, cfg: TrainConfig):
    return _optimizer_of(groups, cfg.steps, cfg.final_lr_ratio, cfg.weight_decay)


@functools.lru_cache(maxsize=64)
def _optimizer_of(groups, steps: int, final_lr_ratio: float, weight_decay: float):
    """One optax transformation per (groups, schedule): a static argument of the jitted step, so the same run shape
    reuses one compilation (every quantize in a process, every layer)."""
    def adamw(lr):
        sched = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=final_lr_ratio)
        return optax.adamw(sched, weight_decay=weight_decay)
    labels = tuple(g.name for g in groups)
    return optax.multi_transform({g.name: adamw(g.lr) for g in groups},
                                 lambda params: tuple(jax.tree.map(lambda _: lab, p) for p, lab in zip(params, labels)))


def train_query_chunk(L: int) -> int:
    """Query chunk of the training step's attention on samples of length L: 8 chunks (at least 64 queries each)
    skip ~44% of the causal triangle's work and its gradient's, where one piece would compute it all."""
    return max(64, L // 8)


def _block_loss(gd, P, train, rest, x, cos, sin, target):
    y = block_output(nnx.merge(gd, *train, rest), x, P, cos, sin)
    return jnp.mean((y.astype(jnp.float32) - target) ** 2)


def _step(gd, P, tx, projects, train, opt_state, rest, x, cos, sin, target):
    """One AdamW step of the trainable groups `train` of block (gd, train, rest) on batch x against target."""
    loss, grads = jax.value_and_grad(_block_loss, argnums=2)(gd, P, train, rest, x, cos, sin, target)
    updates, opt_state = tx.update(grads, opt_state, train)
    train = optax.apply_updates(train, updates)
    train = tuple(p if f is None else f(p) for p, f in zip(train, projects))
    return train, opt_state, loss


_train_step = jax.jit(_step, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4, 5))
def _train_step_rows(gd, P, tx, projects, train, opt_state, rest, x_all, idx, cos, sin, target_all):
    """_step on the rows idx of the block's resident inputs and targets (the gather inside the one dispatch)."""
    return _step(gd, P, tx, projects, train, opt_state, rest, x_all[idx], cos, sin, target_all[idx])


_loss_jit = jax.jit(_block_loss, static_argnums=(0, 1))


class BlockTrainer:
    """Jitted train step / loss for the blocks a BlockRunner runs (one structure: every layer reuses them)."""

    def __init__(self, runner: BlockRunner, groups, cfg: TrainConfig, mesh=None):
        self.runner, self.groups, self.cfg, self.mesh = runner, groups, cfg, mesh
        self.filters = tuple(g.filter for g in groups)
        self.tx = _optimizer(groups, cfg)
        if mesh is None:
            devices = jax.devices()
            if cfg.batch_size % len(devices):
                raise UserError(f"TrainConfig.batch_size {cfg.batch_size} is not divisible by the {len(devices)} "
                                "devices", "TrainConfig.batch_size")
            mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        elif cfg.batch_size % mesh.shape["data"]:
            raise UserError(f"TrainConfig.batch_size {cfg.batch_size} is not divisible by the mesh's data axis "
                            f"({mesh.shape['data']})", "TrainConfig.batch_size")
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.projects = tuple(g.project for g in groups)

    def step(self, gd, train, opt_state, rest, x, cos, sin, target):
        return _train_step(gd, self.runner.P, self.tx, self.projects, train, opt_state, rest, x, cos, sin, target)

    def step_on(self, gd, train, opt_state, rest, x, target, idx: np.ndarray):
        """`step` on the samples idx of x / target (as `resident` returns them): on a single device one jitted call
        that gathers the rows itself; else the batch placed first."""
        cos, sin = self.runner.cos, self.runner.sin
        if self.mesh is None and isinstance(x, jax.Array) and self.batch_sharding.mesh.size == 1:
            return _train_step_rows(gd, self.runner.P, self.tx, self.projects, train, opt_state, rest, x,
                                    np.asarray(idx, np.int32), cos, sin, target)
        xb, tb = self.batch(x, target, idx)
        return self.step(gd, train, opt_state, rest, xb, cos, sin, tb)

    def loss(self, gd, train, rest, x, cos, sin, target):
        return _loss_jit(gd, self.runner.P, train, rest, x, cos, sin, target)

    def _shardings(self, tree):
        if self.mesh is None:
            return self.replicated
        return block_shardings(self.mesh, tree)

    def split(self, block):
        gd, *parts = nnx.split(block, *self.filters, ...)
        train, rest = tuple(parts[:-1]), parts[-1]
        return gd, jax.device_put(train, self._shardings(train)), jax.device_put(rest, self._shardings(rest))

    def init_opt(self, train):
        """The optimizer state of `train`: replicated, or (mesh) each moment split like its parameter."""
        if self.mesh is None:
            return jax.device_put(self.tx.init(train), self.replicated)
        # a moment's path ends in its parameter's (..., "mu", 0, "attn", "q", "kernel"): the same rule splits it
        # like the parameter; the step counts are scalars, replicated
        return jax.jit(self.tx.init, out_shardings=self._shardings(jax.eval_shape(self.tx.init, train)))(train)

    def place(self, train, opt_state, like):
        """(train, opt_state) restored from a checkpoint, put where `like` (the fresh pair) lives."""
        if self.mesh is None:
            return jax.device_put((train, opt_state), self.replicated)
        return jax.device_put((train, opt_state), jax.tree.map(lambda a: a.sharding, like))

    def resident(self, x: np.ndarray, target: np.ndarray):
        """(x, target) of a block held on the device for its steps when there is one device (a batch is then a
        gather there, not a host copy per step); as they are otherwise."""
        if self.mesh is None and self.batch_sharding.mesh.size == 1:
            return jax.device_put(x, self.replicated), jax.device_put(target, self.replicated)
        return x, target

    def batch(self, x, target, idx: np.ndarray):
        if self.mesh is not None:
            return self.runner.place(np.asarray(x)[idx], np.asarray(target)[idx])
        if isinstance(x, jax.Array) and self.batch_sharding.mesh.size == 1:
            return x[idx], target[idx]
        put = lambda a: jax.device_put(a, self.batch_sharding)
        return put(x[idx]), put(target[idx])

    def mean_loss(self, gd, train, rest, x, target) -> float:
        B = self.cfg.batch_size
        tot = 0.0
        for s in range(0, len(x) - B + 1, B):
            xb, tb = self.batch(x, target, np.arange(s, s + B))
            tot += float(self.loss(gd, train, rest, xb, self.runner.cos, self.runner.sin, tb))
        return tot / (len(x) // B)

    def order(self, layer: int, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.cfg.seed, layer, epoch)).permutation(self.cfg.samples)


def train_blockwise(fp_blocks, q_model, x0: np.ndarray, cfg: TrainConfig, groups=None,
                    train_dir=None, progress: bool = True, chunk: int = 8, mesh=None) -> list[dict]:
    """Fine-tune q_model block by block in place; returns per-block logs (loss before/after, seconds).

    x0: embedded training tokens [N, L, D] float32 (N = cfg.samples). `train_dir`: a TrainDir for
    checkpoints and resume (None: no checkpoints). `mesh`: a (data, model) jax.sharding.Mesh (module
    docstring); None: the batch over all jax.devices(). fp_blocks: anything whose `[l]` is FP block l (behind the
    same prefix as q_model's), read once per layer.
    """
    N, L, _ = x0.shape
    if N != cfg.samples:
        raise ValueError(f"x0 has {N} samples, config says {cfg.samples}")
    groups = groups or prefixquant_groups(cfg)
    runner = BlockRunner(q_model.config, q_model.prefix_len, L, mesh)
    trainer = BlockTrainer(runner, groups, cfg, mesh)
    x_fp, x_q = x0, x0
    logs = list(train_dir.meta["blocks"]) if train_dir else []
    done = len(logs)
    for layer in range(done):  # resume: restore finished blocks and replay their forward
        qb = q_model.layers[layer]
        gd, train, rest = trainer.split(qb)
        nnx.update(qb, *train_dir.load_block(layer, train))
        if done < len(q_model.layers):  # the inputs matter only if some block is left to train
            x_q = runner.forward(qb, x_q, chunk)
            x_fp = runner.forward(fp_blocks[layer], x_fp, chunk)
    n_layers = len(q_model.layers)
    for layer in range(done, n_layers):
        t0 = time.time()
        qb = q_model.layers[layer]
        target = runner.forward(fp_blocks[layer], x_fp, chunk)
        qb.query_chunk = train_query_chunk(L)  # in the training graph (gd) only: qb's forwards keep theirs
        try:
            gd, train, rest = trainer.split(qb)
        finally:
            qb.query_chunk = QUERY_CHUNK
        opt_state = trainer.init_opt(train)
        loss_before = trainer.mean_loss(gd, train, rest, x_q, target)
        start = 0
        if train_dir is not None:
            start, saved = train_dir.load_inblock(layer, (train, opt_state))
            if saved is not None:
                train, opt_state = trainer.place(*saved, like=(train, opt_state))
        bar = tqdm(range(start, cfg.steps), desc=f"train block {layer}/{n_layers}", disable=not progress, leave=False)
        running = None
        x_dev, t_dev = trainer.resident(x_q, target)
        for s in bar:
            epoch, i = divmod(s, cfg.steps_per_epoch)
            idx = np.sort(trainer.order(layer, epoch)[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            train, opt_state, loss = trainer.step_on(gd, train, opt_state, rest, x_dev, t_dev, idx)
            loss = float(loss)
            if not np.isfinite(loss):
                raise UserError(f"training diverged: loss {loss} at block {layer} step {s}; lower the learning rates")
            running = loss if running is None else 0.9 * running + 0.1 * loss
            bar.set_postfix(loss=f"{running:.3e}")
            if train_dir is not None and cfg.ckpt_every and (s + 1) % cfg.ckpt_every == 0 and s + 1 < cfg.steps:
                train_dir.save_inblock(layer, s + 1, (train, opt_state))
        nnx.update(qb, *train)
        loss_after = trainer.mean_loss(gd, train, rest, x_q, target)
        log = {"layer": layer, "loss_before": loss_before, "loss_after": loss_after, "steps": cfg.steps,
               "seconds": time.time() - t0}
        if train_dir is not None:
            train_dir.save_block(layer, train, log)
        logs.append(log)
        x_q = runner.forward(qb, x_q, chunk)
        x_fp = target
    return logs
