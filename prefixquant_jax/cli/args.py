"""What the subcommands share: the parser class, the model / evaluation / backend / mesh flags, JSON output."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax.numpy as jnp

from prefixquant_jax.parallel.sharding import MeshSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(2)


def write_json(path: str, obj: dict) -> None:
    """Atomic write (temp file + rename) so a crash never leaves half a JSON file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


def add_model_args(p, dtype=True):
    p.add_argument("--model", default="smollm2", help="bundled name (smollm2), Hugging Face repo id org/name[@revision], "
                   "HF directory, .gguf file, or a directory written by quantize --save")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON to OUT")


def add_eval_args(p, data_flag="--data"):
    p.add_argument(data_flag, default="wikitext2", help="wikitext2 (bundled test split) or a UTF-8 text file")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--eval-log", metavar="FILE.jsonl", help="append each window's NLL here and skip windows already in it "
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
