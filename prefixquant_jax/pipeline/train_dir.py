"""Resumable trainer state on disk (Orbax), laid out so a killed run loses at most one block's work.

    DIR/train.json        what is being trained (fingerprint) and the per-block log; rewritten atomically
    DIR/init/             quant params of every block right after calibration (so a resume skips it)
    DIR/blocks/<l>/       trained state of finished block l (the trainable groups, as flat leaves)
    DIR/inblock/<step>/   the running block: its trainable groups + optimizer state (latest only)

Pytrees are stored as flat dicts {"00000": leaf, ...} and rebuilt with the treedef of a freshly made
template, so any pytree (nnx.State, optax states) round-trips without Orbax knowing its node types.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from prefixquant_jax.errors import UserError
from prefixquant_jax.files import atomic_file, cannot_write, writing

FORMAT = "prefixquant-train/2"  # 2: recipes (with FlatQuant's typed transforms) in the fingerprint
INBLOCK_STRIDE = 1_000_000  # in-block checkpoint id = layer * stride + step


@contextlib.contextmanager
def orbax_writes(path: str):
    """Orbax / tensorstore report a full disk or a read-only target in many exception types: one line naming path."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        raise cannot_write(path, e) from None
    except Exception as e:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot write {path}: {text}") from None


def flat(tree) -> dict:
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def unflat(d: dict, template):
    leaves, treedef = jax.tree.flatten(template)
    if len(d) != len(leaves):
        raise UserError(f"checkpoint holds {len(d)} arrays, expected {len(leaves)}: it was written by a different setup")
    out = []
    for i, ref in enumerate(leaves):
        a = np.asarray(d[f"{i:05d}"])
        if a.shape != np.shape(ref):
            raise UserError(f"checkpoint array {i} has shape {a.shape}, expected {np.shape(ref)}")
        out.append(a.astype(np.asarray(ref).dtype))
    return jax.tree.unflatten(treedef, out)


class TrainDir:
    """One training run's directory. `fingerprint` must match on resume (same model, recipe, data, config)."""

    @staticmethod
    def check_format(path: str) -> None:
        """UserError (one line) unless `path` holds a training run of this format: called before the slow stages."""
        meta_file = os.path.join(path, "train.json")
        try:
            with open(meta_file) as f:
                fmt = json.load(f).get("format")
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"cannot read {meta_file}: {e}") from None
        if fmt != FORMAT:
            raise UserError(f"cannot resume {path}: written in format {fmt!r}, this version resumes {FORMAT!r} (start "
                            "the run again with --overwrite)")

    def __init__(self, path: str, fingerprint: dict, resume: bool, overwrite: bool = False):
        self.path = os.path.abspath(path)
        self.meta_file = os.path.join(self.path, "train.json")
        if resume:
            if not os.path.isfile(self.meta_file):
                raise UserError(f"cannot resume {path}: no train.json there (not a training directory)")
            self.meta = self._read_meta()
            if self.meta.get("format") != FORMAT:
                raise UserError(f"cannot resume {path}: written in format {self.meta.get('format')!r}, this version "
                                f"resumes {FORMAT!r} (start the run again with --overwrite)")
            stored = self.meta.get("fingerprint") or {}
            if stored != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(stored) if fingerprint.get(k) != stored.get(k))
                raise UserError(f"cannot resume {path}: the run there differs in {', '.join(diff)}")
        else:
            if os.path.exists(self.path) and os.listdir(self.path):
                if not overwrite:
                    raise UserError(f"training directory {path} exists; set TrainCheckpoint.resume to continue it or "
                                    "TrainCheckpoint.overwrite to replace it", "TrainCheckpoint.resume", "TrainCheckpoint.overwrite")
                with writing(self.path):
                    shutil.rmtree(self.path)
            with writing(self.path):
                os.makedirs(self.path, exist_ok=True)
            self.meta = {"format": FORMAT, "fingerprint": fingerprint, "blocks": []}
            self.write_meta()
        self._ckptr = ocp.StandardCheckpointer()
        self._inblock = ocp.CheckpointManager(os.path.join(self.path, "inblock"),
                                              options=ocp.CheckpointManagerOptions(max_to_keep=1))

    def _read_meta(self) -> dict:
        try:
            with open(self.meta_file) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {self.meta_file}: {e}") from None

    def write_meta(self) -> None:
        with atomic_file(self.meta_file) as tmp, writing(self.meta_file), open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1)

    # whole pytrees (init / finished blocks): written to a temp name, then renamed by Orbax
    def _save(self, name: str, tree) -> None:
        target = os.path.join(self.path, name)
        with orbax_writes(target):
            if os.path.exists(target):
                shutil.rmtree(target)
            self._ckptr.save(target, tree if name == "init" else flat(tree))
            self._ckptr.wait_until_finished()

    def _load(self, name: str, template):
        try:
            return unflat(self._ckptr.restore(os.path.join(self.path, name)), template)
        except UserError:
            raise
        except Exception as e:  # corrupt or truncated Orbax data
            raise UserError(f"cannot restore {os.path.join(self.path, name)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None

    def has(self, name: str) -> bool:
        return os.path.isdir(os.path.join(self.path, name))

    def save_init(self, qparams: dict) -> None:
        """qparams: {"<layer>": {"<key>": array}} (string keys, so it restores without a template)."""
        self._save("init", qparams)

    def load_init(self) -> dict:
        try:
            return self._ckptr.restore(os.path.join(self.path, "init"))
        except Exception as e:
            raise UserError(f"cannot restore {os.path.join(self.path, 'init')}: {type(e).__name__}") from None

    def done_blocks(self) -> int:
        return len(self.meta["blocks"])

    def save_block(self, layer: int, tree, log: dict) -> None:
        self._save(os.path.join("blocks", str(layer)), tree)
        self.meta["blocks"].append(log)
        self.write_meta()

    def load_block(self, layer: int, template):
        return self._load(os.path.join("blocks", str(layer)), template)

    def save_inblock(self, layer: int, step: int, tree) -> None:
        with orbax_writes(os.path.join(self.path, "inblock")):
            self._inblock.save(layer * INBLOCK_STRIDE + step, args=ocp.args.StandardSave(flat(tree)))
            self._inblock.wait_until_finished()

    def load_inblock(self, layer: int, template):
        """(step, tree) of the latest in-block checkpoint of `layer`, or (0, None)."""
        latest = self._inblock.latest_step()
        if latest is None or latest // INBLOCK_STRIDE != layer:
            return 0, None
        try:
            d = self._inblock.restore(latest, args=ocp.args.StandardRestore())
        except Exception as e:
            raise UserError(f"cannot restore in-block checkpoint {latest} in {self.path}: {type(e).__name__}") from None
        return latest % INBLOCK_STRIDE, unflat(d, template)

    def close(self) -> None:
        self._inblock.wait_until_finished()
        self._inblock.close()
