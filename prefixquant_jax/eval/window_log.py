"""A resumable perplexity evaluation: per-batch NLL sums appended to a JSONL file.

    line 1   {"format": "prefixquant-ppl-log/1", "fingerprint": <sha256>}
    then     {"start": s, "count": n, "tokens": <hash of the batch>, "nll": x}   one line per finished batch

The fingerprint hashes what every sum depends on (the model: its structure, its state with the FP
prefix inside; the window length, the batch size); each line also carries a hash of its own tokens, so a log can be
continued by the same evaluation over more windows (e.g. the first N windows, then the full
test) but never mixed with another model's or another text's numbers. A line torn by a kill is
dropped on reopen.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from prefixquant_jax.errors import UserError
from prefixquant_jax.files import atomic_file, writing

FORMAT = "prefixquant-ppl-log/2"  # 2: the model structure and its prefix state hashed


def batch_hash(batch: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(batch, np.int64).tobytes()).hexdigest()[:16]


def eval_fingerprint(graphdef, state, seqlen: int, batch_size: int, tag: str = "") -> str:
    h = hashlib.sha256()
    h.update(repr(graphdef).encode())  # the structure: recipe, dtypes, prefix ids
    for leaf in jax.tree.leaves(state):
        if not isinstance(leaf, (np.ndarray, jax.Array, np.generic, int, float, bool)):
            h.update(repr(leaf).encode())  # static metadata a pytree may carry as a leaf
            continue
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(f"seqlen={seqlen}|batch={batch_size}|{tag}".encode())
    return h.hexdigest()


class WindowLog:
    def __init__(self, path: str, fingerprint: str):
        self.path = path
        self.done: dict[tuple[int, int, str], float] = {}
        if os.path.exists(path):
            self._read(fingerprint)
        else:  # the header line whole or not at all: a kill never leaves a log without one
            with atomic_file(path) as tmp, writing(path), open(tmp, "w") as f:
                f.write(json.dumps({"format": FORMAT, "fingerprint": fingerprint}) + "\n")

    def _read(self, fingerprint: str) -> None:
        with open(self.path, "rb") as f:
            raw = f.read()
        if raw and not raw.endswith(b"\n"):  # a kill mid-write: drop the torn line
            with writing(self.path), open(self.path, "r+b") as f:
                f.truncate(raw.rfind(b"\n") + 1)
            raw = raw[:raw.rfind(b"\n") + 1]
        lines = raw.decode("utf-8", "replace").splitlines()
        try:
            head = json.loads(lines[0])
            rows = [json.loads(x) for x in lines[1:]]
        except (IndexError, ValueError):
            raise UserError(f"log_path {self.path}: not a perplexity log (unreadable JSON lines)", "log_path") from None
        if not isinstance(head, dict) or not str(head.get("format", "")).startswith("prefixquant-ppl-log/"):
            raise UserError(f"log_path {self.path}: not a perplexity log (format "
                            f"{head.get('format') if isinstance(head, dict) else None!r})", "log_path")
        if head["format"] != FORMAT:
            raise UserError(f"log_path {self.path} was written in format {head['format']!r}; this version writes "
                            f"{FORMAT!r}: give a new file", "log_path")
        if head.get("fingerprint") != fingerprint:
            raise UserError(f"log_path {self.path} belongs to another evaluation (model, prefix, seqlen or batch size "
                            "differ); give a new file", "log_path")
        for r in rows:
            self.done[(int(r["start"]), int(r["count"]), str(r["tokens"]))] = float(r["nll"])

    def _append(self, obj: dict) -> None:
        """One line, flushed to disk (a line torn by a kill or a full disk is dropped when the log is read)."""
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, start: int, batch: np.ndarray) -> float | None:
        """The logged NLL sum of `batch` (windows start..start+len-1), None if not logged for these tokens."""
        return self.done.get((start, len(batch), batch_hash(batch)))

    def add(self, start: int, batch: np.ndarray, nll: float) -> None:
        key = (start, len(batch), batch_hash(batch))
        self.done[key] = nll
        self._append({"start": start, "count": len(batch), "tokens": key[2], "nll": nll})
