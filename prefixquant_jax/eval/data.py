"""Text corpora: the bundled WikiText-2 splits or any UTF-8 file."""
from __future__ import annotations

import gzip
import os

import numpy as np

from prefixquant_jax.errors import UserError

_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
BUNDLED_TEXTS = {"wikitext2": "wiki.test.raw.gz", "wikitext2-valid": "wiki.valid.tokens.gz"}


def load_text(spec: str) -> str:
    """`wikitext2` (test), `wikitext2-valid`, or a path to a UTF-8 text file."""
    if spec in BUNDLED_TEXTS:
        with gzip.open(os.path.join(_DATA_DIR, BUNDLED_TEXTS[spec]), "rt", encoding="utf-8") as f:
            return f.read()
    if not os.path.isfile(spec):
        raise UserError(f"data {spec!r} is neither a bundled corpus ({', '.join(BUNDLED_TEXTS)}) nor an existing file")
    try:
        with open(spec, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{spec}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids as `tokenizer(text).input_ids` gives them by default (special tokens as the tokenizer adds)."""
    import transformers

    transformers.logging.set_verbosity_error()  # silence the "longer than max length" warning
    return np.asarray(tokenizer(text).input_ids, dtype=np.int32)


def windows(ids: np.ndarray, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows [n, seqlen]; the remainder is dropped."""
    n = len(ids) // seqlen
    if n == 0:
        raise UserError(f"text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"max_windows must be >= 1, got {max_windows}", "max_windows")
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_samples(ids: np.ndarray, n: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """`n` random windows of `seqlen` tokens [n, seqlen] drawn with a seeded generator."""
    if len(ids) <= seqlen:
        raise UserError(f"calibration text has {len(ids)} tokens, need more than seqlen={seqlen}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=n)
    return np.stack([ids[s:s + seqlen] for s in starts]).astype(np.int32)
