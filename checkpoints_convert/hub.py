"""Hugging Face repo ids (`org/name`, `org/name@revision`) resolved to a snapshot directory of the local HF cache.

The cache is searched first; the hub is asked only when it is allowed (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
unset) and the cache has no snapshot with weights. The cache directory and the offline switch are read from the
environment at each call: huggingface_hub.constants reads them once, when huggingface_hub is first imported.
"""
from __future__ import annotations

import fnmatch
import os
import re

from checkpoints_convert.errors import FormatError, describe

# what read_checkpoint and load_tokenizer read: config, tokenizer files and weights (not READMEs, ONNX, images, ...)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.gguf", "tokenizer.model", "*.tiktoken",
                  "merges.txt", "vocab.txt"]
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
_REPO_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[^\s@]+))?")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".pt", ".pth")  # a mistyped file path, not a repo


def parse_repo_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` looks like `org/name` or `org/name@revision`, else None."""
    m = _REPO_RE.fullmatch(spec)
    if m is None or m["repo"].lower().endswith(_FILE_SUFFIXES):
        return None
    return m["repo"], m["revision"]


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub would use if imported now: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache by default)."""
    env = os.environ
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(env.get("HF_HOME") or os.path.join(cache, "huggingface"), "hub")
    return os.path.expandvars(os.path.expanduser(path))


def hub_offline() -> bool:
    """True when the hub must not be asked: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set now or when
    huggingface_hub was imported (it refuses every request then)."""
    from huggingface_hub import constants

    env = os.environ
    return _is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)


def _has_weights(folder: str) -> bool:
    return any(fnmatch.fnmatch(f, p) for f in os.listdir(folder) for p in _WEIGHTS)


def resolve_repo(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot directory of `repo_id` at `revision` (default branch when None): from the cache, or
    downloaded (config, tokenizer and weight files only, ALLOW_PATTERNS) when the hub is allowed."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    name = repo_id if revision is None else f"{repo_id} (revision {revision})"
    kw = dict(revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS)
    try:
        folder = huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kw)
    except LocalEntryNotFoundError:  # not cached, or a partial snapshot (IncompleteSnapshotError)
        folder = None
    except HFValidationError as e:
        raise FormatError(f"{repo_id!r} is not a valid Hugging Face repo id ({describe(e)})") from None
    if folder is not None and _has_weights(folder):
        return folder
    if hub_offline():
        if folder is not None:  # e.g. only config and tokenizer were fetched, by another tool
            raise FormatError(f"{name}: the cached snapshot {folder} has no weights ({', '.join(_WEIGHTS)}) and the "
                              "hub is offline (HF_HUB_OFFLINE)")
        raise FormatError(f"{name} is not in the local Hugging Face cache ({cache}) and the hub is offline "
                          "(HF_HUB_OFFLINE)")
    try:
        return huggingface_hub.snapshot_download(repo_id, **kw)
    except Exception as e:  # network, authentication, missing repo or revision: all one line for the user
        raise FormatError(f"{name}: cannot download from the Hugging Face hub into {cache} ({describe(e)})") from None
