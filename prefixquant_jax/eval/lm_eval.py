"""lm-eval-harness model `prefixquant-jax`: our models, fake- or real-quantized, behind lm-eval's tasks.

    import lm_eval, prefixquant_jax.eval.lm_eval                      # registers "prefixquant-jax"
    lm_eval.simple_evaluate(model="prefixquant-jax", model_args="pretrained=runs/models/w4a4kv4-static,backend=real",
                            tasks=["lambada_wikitext2"], task_manager=lm_eval.tasks.TaskManager(
                                include_path=shipped_include_path()))

Model args: `pretrained` (any `--model` spec: smollm2, an HF dir, a .gguf, a `quantize --save` dir),
`backend` fake|real, `fake_matmul` float|int, `kernels` auto|mosaic|triton (real backend: the int4 GEMMs' Pallas
GPU kernels, as `--kernels`), `dtype` float32|bfloat16, `batch_size` (rows per
forward, default 8), `max_batch_tokens` (default 4096), `max_length` (default min(2048, max positions
- prefix)), `max_gen_toks` (256), `add_bos_token`, `prefix_token_id`, `import_prefix` (a prefix KV file).

Every sequence sits behind the model's FP prefix KV (prefix presets): the prefix rows are positions
0..P-1 of the cache and are never scored, as in our perplexity. Token boundaries are lm-eval's
(`TemplateLM._encode_pair`, the same `tok_encode` and `prefix_token_id` as its `hf` backend, left
truncation to `max_length`), so an FP model gives the `hf` backend's numbers.

Static shapes, so nothing is recompiled per request:
- loglikelihood / loglikelihood_rolling: each input is right-padded to the smallest length bucket
  >= its length, from BUCKETS (32, 64, 96, 128, 192, 256, ...: steps of 1.5x and 2x, at most ~1/3 of a
  row is padding; capped by `max_length`, which is the last bucket); a
  bucket of length L runs batches of R = max(1, min(batch_size, max_batch_tokens // L)) rows, a short
  batch padded with dummy rows. At most one compilation per bucket. Causal attention makes the
  padding invisible to the real tokens. Requests with the same input tokens (continuations that differ
  in their last token only, e.g. one-token answers of a multiple-choice question) share one row, as
  lm-eval's `hf` backend shares their logits. One jitted function per shape runs the decoder, then the
  head and log-softmax on the continuation positions only (K of them per row, K from KBUCKETS = 8, 32,
  128, ...: the smallest >= the batch's longest continuation, at most L): for short continuations that
  skips the [R, L, V] logits, about 30 % of a batch's time (lambada_wikitext2 on SmolLM2).
- generate_until: one request at a time (batch 1), greedy. The prompt is right-padded to its bucket
  and prefilled into a cache of bucket(prompt + max_gen_toks) rows; decoding then overwrites the
  padded rows one token at a time (one decode shape per cache bucket). Stops at EOS, at any `until`
  string (cut from the text, as lm-eval does) or after `max_gen_toks` tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import lm_eval.models  # noqa: F401  before registering ours: lm-eval fills its registry lazily only while it is empty
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from prefixquant_jax.errors import UserError
from prefixquant_jax.eval import forward
from prefixquant_jax.eval.models import load_for_eval
from prefixquant_jax.files import atomic_file, writing

BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 32768)


def buckets_for(max_length: int) -> tuple[int, ...]:
    """The length buckets of a model with `max_length` input tokens (max_length is the last)."""
    return tuple(b for b in BUCKETS if b < max_length) + (max_length,)


def bucket_of(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise UserError(f"{n} tokens exceed the model's max length {buckets[-1]}")


KBUCKETS = (8, 32, 128, 512, 2048, 8192, 32768)  # scored positions per row: the smallest >= a batch's need, capped by L


def _gathered_scores(head, h, pos, tgts, mask):
    """Scores of the K positions `pos` [R, K] of the final hidden h [R, L, D]: the head and log-softmax run on
    those positions only. Column 0 is the last continuation position (its log-probabilities [V] and argmax
    come back whole: requests sharing a row differ in that token only); columns with `mask` are the other
    continuation positions, scored against `tgts`: their summed log p(target) and whether each target is the
    argmax."""
    logits = head(h[jnp.arange(h.shape[0])[:, None], pos])  # [R, K, V] float32
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, tgts[..., None], axis=-1)[..., 0]
    shared = jnp.where(mask, tok, 0.0).sum(axis=-1)
    greedy = jnp.all(jnp.where(mask, jnp.argmax(logits, axis=-1) == tgts, True), axis=-1)
    return shared, greedy, logp[:, 0], jnp.argmax(logits[:, 0], axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, tokens, cache, pos, tgts, mask):
    """_gathered_scores of tokens [R, L] at cache.pos..: one jitted forward that computes the head on the scored
    positions only."""
    m = nnx.merge(graphdef, state)
    h, _ = m.hidden(tokens, cache)
    return _gathered_scores(m.head, h, pos, tgts, mask)


def _as_bool(v):
    if v is None or isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise UserError(f"expected a boolean, got {v!r}")


def _as_int(name: str, v, default=None, minimum: int = 1):
    if v is None or v == "auto" or (isinstance(v, str) and v.startswith("auto")):
        return default  # lm-eval's "auto" batch size: our default (shapes are static)
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise UserError(f"model arg {name} must be an integer, got {v!r}") from None
    if i < minimum:
        raise UserError(f"model arg {name} must be >= {minimum}, got {i}")
    return i


@register_model("prefixquant-jax", "prefixquant_jax")
class PrefixQuantLM(TemplateLM):
    """lm-eval LM over a prefixquant_jax model (see the module docstring for the model args)."""

    def __init__(self, pretrained: str = "smollm2", backend: str = "fake", fake_matmul: str = "float",
                 dtype: str = "float32", batch_size=8, max_batch_tokens=4096, max_length=None, max_gen_toks=256,
                 add_bos_token=None, prefix_token_id=None, import_prefix: str | None = None,
                 kernels: str = "auto", loaded=None, device=None, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise UserError(f"unknown prefixquant-jax model arg(s): {', '.join(sorted(unknown))}")
        if backend not in ("fake", "real"):
            raise UserError(f"backend must be fake or real, got {backend!r}")
        if fake_matmul not in ("float", "int"):
            raise UserError(f"fake_matmul must be float or int, got {fake_matmul!r}")
        if kernels not in ("auto", "mosaic", "triton"):
            raise UserError(f"kernels must be auto, mosaic or triton, got {kernels!r}")
        if dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        if loaded is None:  # an eval.models.EvalModel: the one the CLI loaded, or loaded here
            loaded = load_for_eval(str(pretrained), getattr(jnp, dtype), import_prefix, backend, fake_matmul, kernels)
        self.loaded, self.tokenizer = loaded, loaded.tokenizer
        self.graphdef, self.state = nnx.split(loaded.model)
        self.spec, self.backend_name, self.fake_matmul = str(pretrained), backend, fake_matmul
        self.P = loaded.model.prefix_len  # every sequence sits behind the model's FP prefix
        config = loaded.model.config
        room = config.max_position_embeddings - self.P
        self._max_length = _as_int("max_length", max_length, min(2048, room), minimum=2)
        if self._max_length > room:
            raise UserError(f"max_length {self._max_length} (+ prefix {self.P}) exceeds the model's max positions "
                            f"{config.max_position_embeddings}")
        self._batch_size = _as_int("batch_size", batch_size, 8)
        self.max_batch_tokens = _as_int("max_batch_tokens", max_batch_tokens, 4096)
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 256)
        self.add_bos_token = _as_bool(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else _as_int("prefix_token_id", prefix_token_id, minimum=0)
        self.buckets = buckets_for(self._max_length)
        self._caches: dict = {}  # (rows, length) -> empty cache (the scoring path does not donate it)
        self.shapes_run: set = set()  # (rows, length) of every loglikelihood forward (tests check the buckets)

    # ----- what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return jax.devices()[0].platform

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.spec).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_spec": self.spec, "backend": self.backend_name, "fake_matmul": self.fake_matmul,
                "recipe": self.loaded.name, "prefix_len": self.P, "max_length": self._max_length}

    def rows_for(self, length: int) -> int:
        """Rows of a batch in the bucket of `length` tokens."""
        return max(1, min(self._batch_size, self.max_batch_tokens // length))

    # ----- tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As lm-eval's `hf` backend: the tokenizer's default special tokens unless add_bos_token or the call
        says otherwise, none when the string already starts with the BOS text."""
        kw = {} if add_special_tokens is None and self.add_bos_token is None else {
            "add_special_tokens": self.add_bos_token if add_special_tokens is None else add_special_tokens}
        if add_special_tokens is None:
            bos = self.tokenizer.decode(self.prefix_token_id)
            if bos and string.startswith(bos):
                kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ----- scoring
    def _cache(self, rows: int, length: int):
        key = (rows, length)
        if key not in self._caches:
            self._caches[key] = self.loaded.model.init_cache(rows, length)
        return self._caches[key]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation) or None, context_enc, continuation_enc)] -> [(logprob, is_greedy)]."""
        rows: dict[tuple, list] = {}  # (input tokens, continuation length) -> [request index, ...]
        for j, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise UserError("a loglikelihood request needs a non-empty context and continuation")
            if len(cont) > self._max_length:
                raise UserError(f"continuation of {len(cont)} tokens exceeds max_length {self._max_length}")
            whole = (list(ctx) + list(cont))[-(self._max_length + 1):]
            # requests with the same input (same context, continuations differing in their last token only, e.g.
            # one-token answers) share one forward row, as lm-eval's hf backend groups them
            rows.setdefault((tuple(whole[:-1]), len(cont)), []).append(j)
        uniq = sorted(rows, key=lambda key: -len(key[0]))
        chunks, i = [], 0
        while i < len(uniq):
            L = bucket_of(len(uniq[i][0]), self.buckets)
            R = self.rows_for(L)
            k = i + 1
            while k < len(uniq) and k - i < R and bucket_of(len(uniq[k][0]), self.buckets) == L:
                k += 1
            K = min(L, bucket_of(max(ncont for _, ncont in uniq[i:k]), KBUCKETS))
            chunks.append((L, R, K, uniq[i:k]))
            i = k
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="prefixquant-jax loglikelihood", disable=disable_tqdm, leave=False)
        for L, R, K, chunk in chunks:
            toks = np.zeros((R, L), np.int32)
            pos, tgts, mask = np.zeros((R, K), np.int32), np.zeros((R, K), np.int32), np.zeros((R, K), bool)
            for r, (inp, ncont) in enumerate(chunk):
                n = len(inp)
                toks[r, :n] = inp
                pos[r, 0] = n - 1  # the last continuation position: scored per request below
                pos[r, 1:ncont] = np.arange(n - ncont, n - 1)  # the others: position t predicts input token t + 1
                tgts[r, 1:ncont] = inp[n - ncont + 1:n]
                mask[r, 1:ncont] = True
            self.shapes_run.add((R, L))
            shared, greedy, last_logp, last_arg = jax.device_get(_score(
                self.graphdef, self.state, jnp.asarray(toks), self._cache(R, L), jnp.asarray(pos), jnp.asarray(tgts),
                jnp.asarray(mask)))
            for r, key in enumerate(chunk):
                for j in rows[key]:
                    t = requests[j][2][-1]
                    out[j] = (float(shared[r] + last_logp[r, t]), bool(greedy[r]) and int(last_arg[r]) == t)
                    if requests[j][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[j][0], out[j])
                bar.update(len(rows[key]))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood: lm-eval's disjoint windows of `max_length` predicted tokens (the first
        conditioned on `prefix_token_id`), each behind the FP prefix like our perplexity windows."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        res = []
        for req in tqdm(requests, desc="prefixquant-jax generate_until", disable=disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if eos and eos not in until:
                until.append(eos)
            max_gen = kw.pop("max_gen_toks", kw.pop("max_new_tokens", self._max_gen_toks))
            max_gen = _as_int("max_gen_toks", max_gen, self._max_gen_toks)
            sample = _as_bool(kw.get("do_sample"))
            if sample or (sample is None and float(kw.get("temperature") or 0.0) > 0.0):
                raise UserError("prefixquant-jax generates greedily only (do_sample=False, temperature=0)")
            if max_gen >= self._max_length:
                raise UserError(f"max_gen_toks {max_gen} must be below max_length {self._max_length}")
            ids = self.tok_encode(context, left_truncate_len=self._max_length - max_gen)
            out = self.greedy(ids, max_gen, [u for u in until if u])
            text = self.tok_decode(out)
            for term in until:
                if term:
                    text = text.split(term)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            res.append(text)
        return res

    def greedy(self, ids: list[int], max_new: int, stop: list[str] = ()) -> list[int]:
        """Greedy token ids after `ids` (behind the prefix): until EOS, a `stop` string in the decoded text,
        or `max_new` tokens."""
        n = len(ids)
        if n == 0:
            ids, n = [self.prefix_token_id], 1
        Lb, Tb = bucket_of(n, self.buckets), bucket_of(n + max_new, self.buckets)
        toks = np.zeros((1, Lb), np.int32)
        toks[0, :n] = ids
        logits, cache = forward.logits(self.graphdef, self.state, jnp.asarray(toks),
                                        self.loaded.model.init_cache(1, Tb))
        t = int(jnp.argmax(logits[0, n - 1]))
        out = []
        while True:
            out.append(t)
            if t == self.eot_token_id or len(out) >= max_new:
                break
            if stop and any(s in self.tok_decode(out, skip_special_tokens=False) for s in stop):
                break
            # the next token's position: after the real prompt tokens, over the bucket's padding rows
            cache = dataclasses.replace(cache, pos=jnp.asarray(self.P + n + len(out) - 1, jnp.int32))
            nxt, cache = forward.step(self.graphdef, self.state, jnp.asarray([[t]], jnp.int32), cache)
            t = int(nxt[0])
        return out


def shipped_include_path() -> str:
    """A directory with the tasks we ship (prefixquant_jax/data/lm_eval), their `data_files` made absolute,
    to give lm-eval's TaskManager as include_path (lm-eval resolves relative data files against the cwd)."""
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "lm_eval")
    out = os.path.join(tempfile.gettempdir(), f"prefixquant-lm-eval-tasks-{os.getuid() if hasattr(os, 'getuid') else 0}")
    with writing(out):
        os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(src, name), encoding="utf-8") as f:
            text = f.read()
        text = re.sub(r"^(\s+\w+: )(\S+\.jsonl)\s*$", lambda m: m.group(1) + os.path.join(src, m.group(2)), text,
                      flags=re.M)
        path = os.path.join(out, name)
        if not os.path.isfile(path) or open(path, encoding="utf-8").read() != text:
            with atomic_file(path) as tmp, writing(path), open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
    return out
