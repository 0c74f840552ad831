"""Hugging Face repo ids (checkpoints_convert.hub): `org/name[@revision]` resolves to a snapshot of the local HF
cache (a real cache layout built here: refs, snapshots linked to blobs), is downloaded only when the hub is allowed,
and otherwise fails in one line naming the repo, the revision and the cache searched."""
import hashlib
import os
import re

import huggingface_hub
import jax
import numpy as np
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from checkpoints_convert import FormatError, read_checkpoint, resolve_model_path
from checkpoints_convert.hub import ALLOW_PATTERNS, parse_repo_id
from prefixquant_jax.checkpoint.fp import load_checkpoint
from prefixquant_jax.errors import UserError
from tests.conftest import make_tiny_hf

MAIN, V2 = "a" * 40, "b" * 40  # commit hashes


def cache_snapshot(hub, repo_id, ref, commit, seed, weights=True):
    """A tiny model saved as the HF cache stores a download: files in blobs/, linked from snapshots/<commit>/."""
    root = hub / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    make_tiny_hf(snap, seed=seed, tokenizer=False)
    if not weights:
        os.remove(snap / "model.safetensors")
    (root / "blobs").mkdir(exist_ok=True)
    for f in list(snap.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blob)
        f.symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An HF cache holding org/name at main and at tag v2 (another model), found through HF_HUB_CACHE; offline.
    Every snapshot_download call is recorded (local_files_only must be True throughout)."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snaps = {"main": cache_snapshot(hub, "org/name", "main", MAIN, seed=0),
             "v2": cache_snapshot(hub, "org/name", "v2", V2, seed=1)}
    calls, real = [], huggingface_hub.snapshot_download

    def recording(repo_id, **kw):
        calls.append((repo_id, kw))
        return real(repo_id, **kw)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    return hub, snaps, calls


def _leaves(params):
    return jax.tree_util.tree_leaves(params)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_repo_id_reads_the_cached_snapshot(offline_hub):
    hub, snaps, calls = offline_hub
    raw = read_checkpoint("org/name")
    assert (raw.path, raw.name, raw.kind) == (str(snaps["main"]), "org/name", "hf")
    assert _same(raw.params, read_checkpoint(str(snaps["main"])).params)
    v2 = read_checkpoint("org/name@v2")
    assert v2.path == str(snaps["v2"]) and _same(v2.params, read_checkpoint(str(snaps["v2"])).params)
    assert not _same(v2.params, raw.params)  # another model: the revision was followed
    assert read_checkpoint(f"org/name@{V2}").path == str(snaps["v2"])  # a commit hash as the revision
    assert load_checkpoint("org/name@v2").config == load_checkpoint(str(snaps["v2"])).config
    assert calls and all(kw["local_files_only"] and kw["cache_dir"] == str(hub) for _, kw in calls)


def test_hf_home_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = cache_snapshot(tmp_path / "home" / "hub", "org/name", "main", MAIN, seed=0)
    assert resolve_model_path("org/name") == str(snap)


def test_uncached_offline_is_one_line_naming_repo_revision_and_cache(offline_hub):
    hub, _, calls = offline_hub
    with pytest.raises(FormatError) as e:
        read_checkpoint("org/missing")
    assert str(e.value) == (f"org/missing is not in the local Hugging Face cache ({hub}) and the hub is offline "
                            "(HF_HUB_OFFLINE)")
    with pytest.raises(FormatError, match=r"^org/name \(revision nope\) is not in the local Hugging Face cache "
                                          rf"\({re.escape(str(hub))}\)"):
        read_checkpoint("org/name@nope")
    with pytest.raises(UserError, match="org/missing is not in the local Hugging Face cache"):
        load_checkpoint("org/missing")
    assert all(kw["local_files_only"] for _, kw in calls)  # the hub was never asked


def test_cached_snapshot_without_weights_offline(tmp_path, monkeypatch):
    """Only config (and tokenizer) files cached, e.g. by AutoConfig: offline, that is said, not a missing-file error."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = cache_snapshot(tmp_path / "hub", "org/cfg", "main", MAIN, seed=0, weights=False)
    with pytest.raises(FormatError, match=f"org/cfg: the cached snapshot {re.escape(str(snap))} has no weights"):
        read_checkpoint("org/cfg")


def test_download_when_the_hub_is_allowed(tmp_path, monkeypatch):
    """Not cached and online: one snapshot_download of config, tokenizer and weight files into the cache read now
    (the hub itself is faked: this machine has no network)."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        if repo_id == "org/broken":
            raise OSError("connection reset\nby peer")
        return str(cache_snapshot(hub, repo_id, kw["revision"] or "main", V2, seed=2))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    raw = read_checkpoint("org/new@v2")
    assert raw.path == str(hub / "models--org--new" / "snapshots" / V2)
    [(_, local), (repo, kw)] = calls
    assert local["local_files_only"] and repo == "org/new" and not kw.get("local_files_only")
    assert kw["revision"] == "v2" and kw["cache_dir"] == str(hub) and kw["allow_patterns"] == ALLOW_PATTERNS
    assert {"*.json", "*.safetensors", "pytorch_model*.bin", "*.gguf", "tokenizer.model"} <= set(ALLOW_PATTERNS)
    with pytest.raises(FormatError, match=rf"^org/broken: cannot download from the Hugging Face hub into "
                                          rf"{re.escape(str(hub))} \(OSError: connection reset\)$"):
        read_checkpoint("org/broken")


@pytest.mark.parametrize("spec,parsed", [
    ("org/name", ("org/name", None)), ("Org-1/name.v2_x@v1.0", ("Org-1/name.v2_x", "v1.0")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")), ("org/name.gguf", None), ("a/b/c", None),
    ("/abs/dir", None), ("./rel/dir", None), ("name", None), ("org/name@", None)])
def test_parse_repo_id(spec, parsed):
    assert parse_repo_id(spec) == parsed


@pytest.mark.parametrize("spec", ["does/not/exist/file.gguf", "models/tiny.gguf", "nothing"])
def test_neither_path_nor_repo_id_does_not_exist(offline_hub, spec):
    with pytest.raises(FormatError, match=f"model path '{spec}' does not exist"):
        resolve_model_path(spec)
