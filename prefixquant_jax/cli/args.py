"""What the subcommands share: the parser class, the model / evaluation / backend / mesh flags, JSON output."""
from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

from prefixquant_jax.eval.data import BUNDLED_TEXTS
from prefixquant_jax.files import write_json  # noqa: F401 (the subcommands' --json)
from prefixquant_jax.options import Range, field_range
from prefixquant_jax.parallel.sharding import MeshSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(2)


# ---- flag types: every numeric flag has its range and every path flag its kind here, checked while the flags
# are parsed (before anything is loaded); argparse prints `error: prefixquant CMD: argument --FLAG: ...`
def _typed(parse, what):
    def run(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    run.__name__ = what
    return run


def number(kind=int, low=None, high=None, open_low=False):
    """A numeric flag's type: an int or a finite float within its range."""
    r = Range(kind, low, high, open_low)
    t = _typed(r.parse, "number")
    t.range = r  # read by the tests that try every flag
    return t


def option(cls, name: str):
    """The type of the flag that sets option field cls.name: the field's own Range (options.py)."""
    r = field_range(cls, name)
    t = _typed(r.parse, "number")
    t.range = r
    return t


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise ValueError(f"{text!r} is not an existing file")
    return text


def _existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise ValueError(f"{text!r} is not an existing directory")
    return text


def _writable(text: str, directory: bool) -> str:
    """A path we may create: not an existing file where a directory goes (or the reverse), under a parent that is
    (or can be made) a writable directory."""
    path = os.path.abspath(text)
    if directory and os.path.isfile(path):
        raise ValueError(f"{text!r} is a file, not a directory")
    if not directory and os.path.isdir(path):
        raise ValueError(f"{text!r} is a directory, not a file")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {text!r}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write {text!r}: {parent} is not writable")
    return text


def corpus(bundled):
    """A text flag: a bundled corpus name or an existing file."""
    def check(text):
        return text if text in bundled else _existing_file(text)
    return _typed(check, "corpus")


EXISTING_FILE = _typed(_existing_file, "file")
EXISTING_DIR = _typed(_existing_dir, "directory")
NEW_FILE = _typed(lambda t: _writable(t, False), "file")
NEW_DIR = _typed(lambda t: _writable(t, True), "directory")
RATIO = number(float, 0.0, 1.0, open_low=True)
BITS = number(int, 2, 8)


def add_model_args(p, dtype=True):
    p.add_argument("--model", default="smollm2", help="bundled name (smollm2), Hugging Face repo id org/name[@revision], "
                   "HF directory, .gguf file, or a directory written by quantize --save")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    add_json_arg(p)


def add_json_arg(p):
    p.add_argument("--json", dest="json_out", metavar="OUT", type=NEW_FILE, help="write the results as JSON to OUT")


def add_eval_args(p, data_flag="--data"):
    p.add_argument(data_flag, default="wikitext2", type=corpus(BUNDLED_TEXTS),
                   help="wikitext2 (bundled test split) or a UTF-8 text file")
    p.add_argument("--seqlen", type=number(int, 2), default=2048)
    p.add_argument("--max-windows", type=number(int, 1), default=None)
    p.add_argument("--batch-size", type=number(int, 1), default=1, help="windows per forward pass")
    p.add_argument("--eval-log", metavar="FILE.jsonl", type=NEW_FILE, help="append each window's NLL here and skip windows already in it "
                   "(resume a killed evaluation; the file is tied to this exact model and data)")


def add_backend_args(p):
    p.add_argument("--backend", default="fake", choices=("fake", "real"),
                   help="fake: fake-quantized float model; real: packed int4 integer runtime (needs --model DIR from quantize --save)")
    p.add_argument("--fake-matmul", default="float", choices=("float", "int"),
                   help="fake backend: multiply dequantized floats (default), or compute each quantized linear as the "
                        "integer runtime does (exact integer accumulation, then scales): the real runtime's numbers")
    p.add_argument("--kernels", default="auto", choices=("auto", "mosaic", "triton"),
                   help="real backend: Pallas GPU backend of the int4 GEMMs; auto: Mosaic GPU on an H100/H200, "
                        "Triton elsewhere (rotate+quantize and decode attention are Triton kernels either way)")


def add_mesh_arg(p, default="all local devices on data"):
    p.add_argument("--mesh", metavar="data=D,model=M", default=None,
                   help=f"device mesh (default: {default}): batches split over data, weights over "
                        "model (Megatron: attention heads / MLP columns, o and down by rows); prefixquant_jax/parallel/sharding.py")


def mesh_spec(args) -> MeshSpec:
    return MeshSpec.parse(getattr(args, "mesh", None))


def mesh_tag(mesh) -> str:
    """Eval-log tag of a mesh whose `model` axis splits sums (data alone leaves every number as it is)."""
    return f"mesh-model={mesh.shape['model']}" if mesh is not None and mesh.shape["model"] > 1 else ""
