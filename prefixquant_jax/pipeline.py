"""The quantization pipeline: rotate -> find outlier tokens -> FP prefix KV -> RTN (or GPTQ) weights -> calibrate
-> block-wise training (FlatQuant: always, then merge).

`quantize(checkpoint, tokenizer, preset, options, calib_tokens, train=, train_tokens=, checkpoint=)` returns a
`QuantizedModel`: a Llama whose recipe fake-quantizes the named sites, its static qparams, the FP prefix KV
and a report of every stage. The public entry point is api.quantize (token arrays in, options checked).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from prefixquant_jax.calibrate import CLIP_GRID, CalibConfig, calibrate, calibrate_static
from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize
from prefixquant_jax.kv_cache import Cache, behind_prefix, prefix_len
from checkpoints_convert.lazy import streamed
from prefixquant_jax.model import Block, Llama, with_recipe
from prefixquant_jax.options import QuantizeOptions, TrainCheckpoint, TrainConfig, train_config
from prefixquant_jax.prefix.outliers import capture_token_ranges, choose_prefix, outlier_ratios, token_absmax
from prefixquant_jax.prefix.prefix_kv import PrefixKV, compute_prefix_kv
from prefixquant_jax.quant.ops import weight_scale
from prefixquant_jax.quant.qarray import quantize as quantize_array
from prefixquant_jax.quant.presets import Preset
from prefixquant_jax.quant.recipe import WEIGHT_NAMES, QuantRecipe
from prefixquant_jax.rotate.fuse import LazyRotation, RotationConfig

WEIGHT_CLIP_GRID = CLIP_GRID


@dataclasses.dataclass
class QuantizedModel:
    config: object
    model: Llama
    # the FP reference model (rotated like `model`), or None (a loaded model); `quantize` gives a LazyFPModel,
    # built from the checkpoint when first read (training does; quantizing and evaluating do not hold it)
    fp_model: Llama | None = dataclasses.field(repr=False, compare=False)
    prefix_kv: PrefixKV | None
    preset: Preset
    report: dict
    # the integer weights a saved model was loaded with, {(layer, linear name): QArray} (checkpoint/saved.py):
    # runtime.pack hands these codes to the kernels as they were stored
    weights: dict = dataclasses.field(default_factory=dict)

    def split(self, *filters):
        """nnx.split of the quantized model: (graphdef, state, ...); e.g. split(Scale, ...) puts the
        quantizer scales in their own state, for gradients w.r.t. them only."""
        return nnx.split(self.model, *filters)

    def weight(self, layer: int, name: str):
        """The QArray (quant/qarray.py) of linear `name` (q k v o gate up down) of block `layer`, as the
        forward quantizes it; UserError when that weight is not quantized."""
        blk = self.model.layers[layer]
        spec = getattr(blk.recipe, "weight", None)
        if spec is None or name not in blk.qparams:
            raise UserError(f"layer {layer} weight {name!r} is not quantized in preset {self.preset.name!r}")
        return quantize_array(blk.linear_module(name).kernel[...], spec.replace(dynamic=False),
                              scale=blk.qparams[name]["scale"][...])

    @property
    def prefix_len(self) -> int:
        """P: the FP prefix occupies positions 0..P-1; every token this model sees sits at P or later."""
        return prefix_len(self.prefix_kv)

    def init_cache(self, batch: int, max_len: int) -> Cache:
        """A decoding cache for positions 0..max_len-1 whose first P rows hold the FP prefix (pos = P)."""
        kv, pos = behind_prefix(self.prefix_kv, self.config, batch, max_len - self.prefix_len, self.model.dtype)
        return Cache(kv=kv, pos=jnp.asarray(pos, jnp.int32))

    def compiled(self):
        """The jitted entry points (compiled.Compiled) of the fake-quant model behind its FP prefix."""
        from prefixquant_jax.compiled import Compiled
        return Compiled(self.model, self.prefix_kv)

    def apply(self, state, tokens, cache: Cache | None = None):
        """Logits [B, L, V] of int tokens [B, L] behind the model's FP prefix KV.

        Without `cache`: the tokens at positions P..P+L-1 right after the prefix; returns the logits.
        With `cache` (from init_cache, or returned by an earlier apply): the tokens at cache.pos..cache.pos+L-1;
        returns (logits, the cache with their rows written and pos advanced by L), for prefill then decode.
        Pure in `state` (one state from `split()`, or a tuple of the states of `split(filters...)`) and in
        `cache`, so it can be jitted and differentiated; the graph and the prefix are fixed by this
        QuantizedModel."""
        graphdef = nnx.graphdef(self.model)
        states = state if isinstance(state, tuple) else (state,)
        model = nnx.merge(graphdef, *states)
        tokens = jnp.asarray(tokens, jnp.int32)
        B, L = tokens.shape
        if cache is None:
            kv, offset = behind_prefix(self.prefix_kv, self.config, B, L, model.dtype)
            return model(tokens, kv, offset)[0]
        logits, kv = model(tokens, cache.kv, cache.pos)
        return logits, Cache(kv=kv, pos=cache.pos + L)


class LazyFPModel:
    """The FP reference model of a `quantize` run, not yet built: `build()` makes it from the checkpoint (its
    layers rotated one at a time when the preset rotates), the same values as the model the pipeline starts from."""

    def __init__(self, ck, rot: RotationConfig | None, recipe):
        self.ck, self.rot, self.recipe = ck, rot, recipe

    def _params(self) -> tuple:
        if self.rot is None:
            return self.ck.config, streamed(self.ck.params)
        rotation = LazyRotation(self.ck.params, self.ck.config, self.rot)
        return rotation.config, rotation.params

    def build(self) -> Llama:
        config, params = self._params()
        return Llama.from_params(config, params, recipe=self.recipe)

    def blocks(self) -> "_LazyFPBlocks":
        """The FP model's blocks, block l built (read, rotated) each time it is asked for: what the block-wise
        trainer reads of the FP model, without holding it (the same values as build().layers[l])."""
        return _LazyFPBlocks(*self._params(), self.recipe)


class _LazyFPBlocks:
    """`.config` and `.layers[l]`: FP block l from (lazy) params, built when asked for and not kept."""

    def __init__(self, config, params: dict, recipe):
        self.config, self._params, self._recipe = config, params, recipe
        self.layers = self

    def __len__(self) -> int:
        return self.config.num_layers

    def __getitem__(self, layer: int) -> Block:
        return Block(self.config, self._params["layers"][layer], jnp.float32, self._recipe)  # as Llama.from_params


def _get_fp_model(self):
    fp = self.__dict__.get("_fp_model")
    if isinstance(fp, LazyFPModel):
        fp = self.__dict__["_fp_model"] = fp.build()
    return fp


def _set_fp_model(self, value):
    self.__dict__["_fp_model"] = value


def _fp_blocks(self):
    """What block-wise training reads of the FP reference model (`.layers[l]`, `.config`): while the model is not
    built (a LazyFPModel), its blocks one at a time from the checkpoint; else the model itself."""
    fp = self.__dict__.get("_fp_model")
    return fp.blocks() if isinstance(fp, LazyFPModel) else fp


QuantizedModel.fp_model = property(_get_fp_model, _set_fp_model, doc="The FP reference model (built on first read).")
QuantizedModel.fp_blocks = _fp_blocks


class _FPBlocks:
    """What `calibrate` reads of the FP model (`.layers[l]`, `.config`) without holding one: layer l is an FP
    block (`recipe`: the rotated model's online R3/R4, or None) over q_model.layers[l]'s arrays as they are when
    asked for. Valid while that block's kernels are still the FP ones: calibrate asks for layer l before it
    touches q block l (GPTQ replaces its kernels; the FP block keeps the old arrays)."""

    def __init__(self, q_model: Llama, recipe):
        self.config, self._q, self._recipe = q_model.config, q_model, recipe
        self.layers = self

    def __len__(self) -> int:
        return len(self._q.layers)

    def __getitem__(self, layer: int) -> Block:
        p = self._q.params_dict()["layers"][layer]  # references to the arrays: no copy
        return Block(self.config, p, self._q.dtype, self._recipe)


def init_weight_scales(model: Llama, spec, progress=True) -> None:
    """RTN init: per-output-channel scale of every linear kernel (MSE-searched clip) into
    qparams[<name>]["scale"]; the kernels stay FP and the recipe fake-quantizes them. Embed/head stay FP."""
    f = jax.jit(lambda w: weight_scale(w, spec, WEIGHT_CLIP_GRID))
    for blk in tqdm(model.layers, desc="weights", disable=not progress, leave=False):
        for name in WEIGHT_NAMES:
            blk.set_quantizer(name, f(blk.linear_module(name).kernel[...]))


def find_prefix(unrotated_model, tokenizer, calib: np.ndarray, eta: float, progress=True) -> dict:
    """Outlier statistics at the down_proj input and the prefix chosen by the eta rule.

    Measured on the unrotated FP model: a Hadamard rotation spreads a token's massive channel over
    all channels, so on SmolLM2 the max/median ratio drops from 34-81 to 3-12 and no token would pass
    eta. The tokens themselves (their norms) stay outliers after rotation; that is what the prefix fixes.
    """
    ranges = capture_token_ranges(unrotated_model, calib, progress=progress, desc="outliers")
    ratios = outlier_ratios(token_absmax(ranges, "down_in"))
    choice = choose_prefix(calib, ratios, eta, unrotated_model.config.bos_token_id)
    choice["prefix_text"] = [_decode(tokenizer, [t]) for t in choice["prefix_ids"]]
    return choice


def _decode(tokenizer, ids) -> str:
    """Text of token ids for reports; without a tokenizer (token-array calibration) the ids themselves."""
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))


def calibration_tokens(calib_tokens) -> np.ndarray:
    """Calibration samples as int32 [N, L] (N >= 1, L >= 2); UserError otherwise."""
    a = np.asarray(calib_tokens)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 2 or not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"calibration tokens must be an integer array [samples, seqlen], got {a.dtype}{list(a.shape)}")
    return a.astype(np.int32)


def needs_calibration(preset: Preset, opts: QuantizeOptions) -> bool:
    """Whether quantizing with `preset` and `opts` uses calibration tokens (FP presets with data-free RTN
    weights do not)."""
    return bool(preset.prefix or preset.is_static or preset.method == "flatquant" or opts.gptq
                or (bool(preset.w_bits) and opts.weight_clip == "output"))


def _train_fingerprint(preset: Preset, opts: QuantizeOptions) -> dict:
    """PrefixQuant's part of a training run's fingerprint: the rules that decide the calibrated start (a resume
    must use the same), under the names that train.json files already use."""
    rules = {"weight_clip": opts.weight_clip, "kv_clip": opts.kv_rule, "clip_search": opts.search,
             "clip_target": opts.target, "grid": "full" if preset.full_grid else "narrow"}
    gptq = {"gptq_damp": opts.gptq_damp, "gptq_order": "act" if opts.gptq_act_order else "natural"} if opts.gptq else {}
    return {**gptq, "rules": rules}


def _check_positions(config, prefix_len: int, calib, train_tokens) -> None:
    for what, a in (("calibration", calib), ("training", train_tokens)):
        if a is not None and a.shape[1] + prefix_len > config.max_position_embeddings:
            raise UserError(f"{what} tokens of length {a.shape[1]} (+ prefix {prefix_len}) exceed the model's max "
                            f"positions {config.max_position_embeddings}")


def _training(preset: Preset, opts: QuantizeOptions, tokenizer, train, train_tokens, checkpoint):
    """(TrainConfig or None, training tokens or None, opts), checked before any slow stage."""
    flat = preset.method == "flatquant"
    if opts.flatquant is not None and not flat:
        raise UserError(f"QuantizeOptions.flatquant applies to FlatQuant presets, not {preset.name!r}",
                        "QuantizeOptions.flatquant")
    if train is not None and not isinstance(train, TrainConfig):
        raise UserError(f"train must be a TrainConfig or None, got {type(train).__name__}")
    hook = flat and opts.flatquant is not None and callable(opts.flatquant.train)  # it trains on its own data
    if flat and train is None and not hook:  # FlatQuant always trains: the `fast` preset, sized to the tokens
        train = train_config("fast")
        if train_tokens is not None and np.ndim(train_tokens) == 2:
            n, L = np.shape(train_tokens)
            train = dataclasses.replace(train, samples=n, seqlen=L, batch_size=min(train.batch_size, n))
    if checkpoint is not None:
        if not isinstance(checkpoint, TrainCheckpoint):
            raise UserError(f"checkpoint must be a TrainCheckpoint or None, got {type(checkpoint).__name__}")
        if train is None:
            raise UserError("a TrainCheckpoint checkpoints a training run: give train=TrainConfig(...)")
        checkpoint.check()
        if checkpoint.restores_calibration:  # the calibrated scales are restored from DIR/init
            opts = dataclasses.replace(opts, calibrate=False)
    if train is None or hook:
        return train, None, opts
    if train_tokens is None:
        if tokenizer is None:
            raise UserError("training needs train_tokens: int [TrainConfig.samples, TrainConfig.seqlen]")
        train_tokens = calibration_samples(tokenize(tokenizer, load_text(opts.calib_data)), train.samples,
                                           train.seqlen, train.seed)
    from prefixquant_jax.train.finetune import train_tokens as checked_tokens
    return train, checked_tokens(train_tokens, train), opts


def quantize(ck, tokenizer, preset: Preset, opts: QuantizeOptions = QuantizeOptions(), calib_tokens=None, *,
             train: TrainConfig | None = None, train_tokens=None,
             checkpoint: TrainCheckpoint | None = None, mesh=None) -> QuantizedModel:
    """The pipeline: rotate -> prefix -> weights (-> GPTQ) -> calibrate (-> training) (-> FlatQuant merge).

    Calibration samples: `calib_tokens` (int [N, L]) when given, else opts.calib_samples x opts.calib_seqlen
    drawn from opts.calib_data with `tokenizer`. The tokenizer is optional with token arrays (reports then
    show token ids, not text). `train`: a TrainConfig, block-wise fine-tuning after calibration on
    `train_tokens` (int [train.samples, train.seqlen]; None: drawn from opts.calib_data with the tokenizer and
    train.seed); FlatQuant presets always train (train None: the `fast` preset, sized to train_tokens).
    `checkpoint`: a TrainCheckpoint for the training run (a resume restores the calibrated scales).
    `mesh`: a sharding.MeshSpec that calibration and training run their blocks on (weights split over `model`,
    samples over `data`); None: calibration on one device, training's batch over all jax.devices()."""
    mesh = None if mesh is None else mesh.make_for(ck.config)  # widths and device count checked now
    train, train_tokens, opts = _training(preset, opts, tokenizer, train, train_tokens, checkpoint)
    if calib_tokens is None and tokenizer is None and needs_calibration(preset, opts):
        raise UserError(f"preset {preset.name!r} needs calibration tokens (int [samples, seqlen])")
    if opts.gptq and (preset.method == "flatquant" or not preset.w_bits):
        raise UserError(f"QuantizeOptions.gptq needs a PrefixQuant preset with quantized weights, not {preset.name!r}",
                        "QuantizeOptions.gptq")
    if opts.prefix_ids and max(opts.prefix_ids) >= ck.config.vocab_size:
        raise UserError(f"QuantizeOptions.prefix_ids: id {max(opts.prefix_ids)} is outside the vocabulary "
                        f"({ck.config.vocab_size})", "QuantizeOptions.prefix_ids")
    given = None if calib_tokens is None else calibration_tokens(calib_tokens)
    known_p = len(opts.prefix_ids or ()) if opts.prefix_kv is None else prefix_len(opts.prefix_kv)
    _check_positions(ck.config, known_p if preset.prefix else 0, given, train_tokens)
    times, report = {}, {"preset": preset.name, "seed": opts.seed, "eta": opts.eta}
    # Host memory grows with the block, not the model (issue [L]): the checkpoint's layers are read (and
    # rotated) one at a time, the only whole model held is the quantized one (the FP model of the outlier
    # statistics is dropped before it is built; calibration's FP blocks share its arrays, block by block).
    recipe = preset.recipe()
    flat = preset.method == "flatquant"
    calib = None
    if needs_calibration(preset, opts) and given is not None:
        calib = given
    elif needs_calibration(preset, opts):
        ids = tokenize(tokenizer, load_text(opts.calib_data))
        calib = calibration_samples(ids, opts.calib_samples, opts.calib_seqlen, opts.seed)

    prefix_ids = None
    if preset.prefix:
        t = time.time()
        if opts.prefix_kv is not None:  # imported: the caller checked kv heads and head_dim against the model
            prefix_ids = list(opts.prefix_kv.prefix_ids)
            report["outliers"] = {"prefix_ids": prefix_ids, "source": "imported"}
            if opts.prefix_kv.k_rotated != preset.rotate or len(opts.prefix_kv.k) != ck.config.num_layers:
                raise UserError(f"the given prefix KV (k_rotated={opts.prefix_kv.k_rotated}, {len(opts.prefix_kv.k)} layers) does not "
                                f"fit preset {preset.name!r} (rotated={preset.rotate}, {ck.config.num_layers} layers)")
        elif opts.prefix_ids:
            prefix_ids = list(opts.prefix_ids)
            report["outliers"] = {"prefix_ids": prefix_ids, "source": "given"}
        else:  # on the unrotated FP model (find_prefix), dropped before the rotated one is built
            plain = Llama.from_params(ck.config, streamed(ck.params))
            choice = find_prefix(plain, tokenizer, calib[:opts.outlier_samples], opts.eta, opts.progress)
            del plain
            prefix_ids = choice["prefix_ids"]
            report["outliers"] = choice
        if not prefix_ids:
            raise UserError("the prefix is empty: the model has no BOS id and no outlier token passed eta; "
                            "lower QuantizeOptions.eta", "QuantizeOptions.eta")
        times["outliers"] = time.time() - t

    t = time.time()
    rot = RotationConfig(r1=preset.rotate, r2=preset.rotate, r3=preset.rotate, r4=preset.rotate, seed=opts.seed)
    if preset.rotate:
        rotation = LazyRotation(ck.params, ck.config, rot)  # layer i folded and rotated when read
        params, config = rotation.params, rotation.config
        fp_recipe = QuantRecipe(r3=True, r4=True)
    else:
        rotation, params, config, fp_recipe = None, streamed(ck.params), ck.config, None
    q_model = Llama.from_params(config, params, recipe=recipe)  # one layer of params at a time
    if rotation is not None:
        rotation.release()
    # until the weights are quantized, q_model's kernels are the FP ones: the FP model is q_model's arrays
    # (FlatQuant never changes them before its merge: its transforms and clips are variables of their own)
    fp_now = with_recipe(q_model, fp_recipe)
    times["rotate"] = time.time() - t

    prefix_kv = None
    if preset.prefix:
        t = time.time()
        text = _decode(tokenizer, prefix_ids)
        prefix_kv = opts.prefix_kv or compute_prefix_kv(fp_now, prefix_ids, text=text, k_rotated=preset.rotate)
        times["prefix"] = time.time() - t
        _check_positions(config, prefix_kv.length, calib, train_tokens)
    report["prefix_ids"] = [] if prefix_kv is None else prefix_kv.prefix_ids
    report["prefix_text"] = [] if prefix_kv is None else [_decode(tokenizer, [i]) for i in prefix_kv.prefix_ids]

    t = time.time()
    q_model.prefix_len = prefix_len(prefix_kv)  # its scales are calibrated behind the prefix: a call needs it
    if flat:  # learned transforms instead of rotations; weights quantized with LWC in the forward
        from prefixquant_jax.flatquant.pipeline import init_flatquant
        q_model, recipe, report["flatquant"] = init_flatquant(fp_now, q_model, recipe, calib, prefix_kv,
                                                              opts.seed, opts.flatquant, opts.progress)
    del fp_now
    weight_pass = not flat and bool(preset.w_bits) and (opts.weight_clip == "output" or opts.gptq)
    if not flat and preset.w_bits and not weight_pass:
        init_weight_scales(q_model, preset.weight_spec(), opts.progress)
    times["weights"] = time.time() - t
    static_calib = preset.is_static and recipe is not None and opts.calibrate
    if weight_pass or static_calib:  # block by block on the embedded calibration tokens
        calib_x = np.asarray(jnp.asarray(params["embed"])[jnp.asarray(calib)], np.float32)
        t = time.time()
        fp_blocks = _FPBlocks(q_model, fp_recipe)  # read by calibrate one block at a time
        if flat:
            cfg = CalibConfig(grid_samples=opts.grid_samples)  # FlatQuant: its original rules
            report["calibration"] = calibrate_static(fp_blocks, q_model, recipe, calib_x, prefix_kv, cfg, opts.progress,
                                                     mesh)
        else:  # a resumed training run redoes data-dependent weights (deterministic) and restores the static scales
            cfg = CalibConfig(grid_samples=opts.grid_samples, weight_clip=opts.weight_clip if weight_pass else None,
                              gptq=opts.gptq, gptq_damp=opts.gptq_damp, gptq_inputs=opts.gptq_inputs,
                              gptq_act_order=opts.gptq_act_order, kv_rule=opts.kv_rule, search=opts.search,
                              target=opts.target, static=opts.calibrate or weight_pass)
            report["calibration"] = calibrate(fp_blocks, q_model, recipe, calib_x, prefix_kv, cfg, opts.progress, mesh)
        report["calibration_rules"] = {"weight_clip": None if flat or not preset.w_bits else opts.weight_clip,
                                       **{k: getattr(cfg, k) for k in ("gptq", "kv_rule", "search", "target",
                                                                       "grid_samples")}}
        if opts.gptq:  # the order, and the quantity GPTQ minimises, per token, for the clip rule's rounding and for GPTQ
            report["calibration_rules"]["gptq_order"] = "act" if opts.gptq_act_order else "natural"
            report["calibration_rules"]["gptq_inputs"] = opts.gptq_inputs
            report["gptq"] = [{"layer": r["layer"], "rtn_err": {n: e[cfg.weight_clip] for n, e in r["weights"].items()},
                               "gptq_err": {n: e["gptq"] for n, e in r["weights"].items()}}
                              for r in report["calibration"]]
        times["calibrate"] = time.time() - t
    del params
    fp_model = LazyFPModel(ck, rot if preset.rotate else None, fp_recipe)  # built from the checkpoint only if read
    qm = QuantizedModel(config=config, model=q_model, fp_model=fp_model, prefix_kv=prefix_kv, preset=preset, report=report)
    if flat:  # FlatQuant always trains, then folds the transforms into the weights
        from prefixquant_jax.flatquant.pipeline import train_and_merge
        t = time.time()
        train_and_merge(qm, train_tokens, train, opts.flatquant, checkpoint, opts.progress, mesh)
        times["train_merge"] = time.time() - t
    elif train is not None:  # PrefixQuant fine-tuning: scales and (train.train_weights) weights, block by block
        from prefixquant_jax.train.finetune import train_quantized
        t = time.time()
        report["train"] = train_quantized(qm, train_tokens, train, checkpoint=checkpoint,
                                          fingerprint=_train_fingerprint(preset, opts), progress=opts.progress,
                                          mesh=mesh)
        times["train"] = time.time() - t
    report["seconds"] = times
    return qm
