"""`quantize --coordinator HOST:PORT --num-processes 2 --process-id I` (prefixquant_jax/parallel/distributed.py): two
local processes (jax.distributed over loopback, gloo CPU collectives, one CPU device each) run `quantize --train` on the
tiny model; the training batch is split over both processes' devices and XLA all-reduces the gradients.

Reference: one process with the same two-device mesh (XLA_FLAGS=--xla_force_host_platform_device_count=2).
Measured: the block losses and every saved scale and weight are bit-identical (each device sums the same half
batch, and a sum of two partial gradients is the same in either order), so the test asserts equality. Against a
one-device run the gradients are summed in another order; Adam turns those few-ulp differences into different
steps: on this model (w4a4kv4-static, 8 samples, 2 epochs) loss_before of block 0 agreed to 2e-7 relative and
the trained losses to 3 % (not asserted).
Both processes get the same --json and --save paths, as a launcher gives them: process 0 alone writes.
"""
import json
import os
import socket
import subprocess

import numpy as np
import pytest

from tests.parallel.four_devices import ROOT, cli_command, device_env
from tests.cli.util import assert_one_line_error, main_cli

FLAGS = ["quantize", "--preset", "w4a4kv4-dynamic", "--calib-samples", "2", "--calib-seqlen", "16", "--prefix-ids", "1",
         "--weight-clip", "mse", "--no-eval", "--train", "--train-samples", "4", "--train-seqlen", "16", "--epochs", "2",
         "--train-batch-size", "2", "--lr-quant", "1e-3", "--lr-weight", "1e-4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(tiny_dir, text_file, out_dir, *extra):
    return cli_command(*FLAGS, "--model", tiny_dir, "--calib-data", text_file, "--json",
                       os.path.join(out_dir, "q.json"), "--save", os.path.join(out_dir, "saved"), *extra)


@pytest.fixture(scope="module")
def runs(tiny_dir, text_file, tmp_path_factory):
    env = device_env(1)
    two, one = str(tmp_path_factory.mktemp("two-processes")), str(tmp_path_factory.mktemp("one-process"))
    port = _free_port()
    procs = [subprocess.Popen(_cmd(tiny_dir, text_file, two, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                   "2", "--process-id", str(i)), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    ref = subprocess.run(_cmd(tiny_dir, text_file, one), cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=device_env(2))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert ref.returncode == 0, ref.stderr[-3000:]
    return two, one, logs


def _qparams(saved: str) -> dict:
    import prefixquant_jax as pq

    qm = pq.load(saved)
    out = {}
    for i, blk in enumerate(qm.model.layers):
        out.update({f"{i}.{w}.{f}": np.asarray(v[...]) for w, q in blk.qparams.items() for f, v in q.items()})
        out.update({f"{i}.{n}": np.asarray(blk.linear_module(n).kernel[...]) for n in ("q", "o", "down")})
    return out


@pytest.mark.slow  # about 3 minutes on the shared 2-core CPU (three quantize runs, two of them side by side)
def test_two_processes_reproduce_the_one_process_run(runs):
    two, one, logs = runs
    res2, res1 = (json.load(open(os.path.join(d, "q.json"))) for d in (two, one))
    blocks = lambda r: [(b["loss_before"], b["loss_after"]) for b in r["report"]["train"]["blocks"]]
    assert len(blocks(res2)) == 2 and blocks(res2) == blocks(res1)
    a, b = _qparams(os.path.join(two, "saved")), _qparams(os.path.join(one, "saved"))
    assert a.keys() == b.keys() and "0.q.scale" in a  # the weight scales are among them (qparams keyed by linear)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert "quantized model saved" in logs[0] and "quantized model saved" not in logs[1]  # process 0 alone writes


@pytest.mark.parametrize("args,msg", [
    (["--coordinator", "localhost"], "expected HOST:PORT"),
    (["--coordinator", "127.0.0.1:1234"], "needs --num-processes"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1"),
    (["--num-processes", "2", "--process-id", "0"], "need --coordinator"),
])
def test_distributed_flag_errors(tiny_dir, args, msg, capsys):
    """Checked before jax.distributed starts (so in this process)."""
    assert_one_line_error(main_cli(capsys, "quantize", "--model", tiny_dir, "--preset", "w4a4kv4-dynamic", *args), msg)
