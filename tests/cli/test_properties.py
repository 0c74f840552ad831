"""Property ([R]): any combination of `eval` and `quantize` arguments on the tiny model ends in exit 0 with a result,
or exit 2 with exactly one `error:` line and no traceback (hypothesis draws the combinations, valid and not)."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.util import main_cli

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


OUTCOMES = {"eval": set(), "quantize": set()}  # what the examples ended in: both kinds must occur


def _check(res, out, cmd):
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    OUTCOMES[cmd].add(res.returncode)
    if res.returncode == 0:
        assert errors == [] and "ppl" in json.loads(out.read_text())
    else:
        assert res.returncode == 2 and len(errors) == 1, (res.returncode, res.stderr[-3000:])


def often(valid, invalid):
    """Mostly valid values (so that whole runs happen), sometimes an invalid one."""
    return st.sampled_from(list(valid) * 3 + list(invalid))


def _flags(draw_dict):
    return [a for flag, v in draw_dict.items() if v is not None for a in (flag, str(v))]


EVAL = st.fixed_dictionaries({
    "--seqlen": often([16, 32, 300], [0, 1, 10**9]),
    "--max-windows": often([None, 1, 2], [0, -1]),
    "--batch-size": often([None, 1, 2, 3], [0]),
    "--dtype": often([None, "float32", "bfloat16"], ["float8"]),
    "--backend": often([None, "fake"], ["real"]),
    "--fake-matmul": st.sampled_from([None, "float", "int"]),
})


@SETTINGS
@given(flags=EVAL, data=often(["text"], ["missing", "empty"]))
def test_eval_combinations(flags, data, tiny_dir, text_file, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("ev")
    path = {"text": text_file, "missing": str(tmp / "none.txt"), "empty": str(tmp / "empty.txt")}[data]
    (tmp / "empty.txt").write_text("")
    out = tmp / "out.json"
    _check(main_cli(capsys, "eval", "--model", tiny_dir, "--data", path, *_flags(flags), "--json", str(out)), out, "eval")


QUANTIZE = st.fixed_dictionaries({
    "--preset": often(["fp", "w4a4kv4-dynamic", "w4a8kv4-static", "quarot-w4a4kv4"], ["nope"]),
    "--w-bits": often([None, 4, 8], [1]),
    "--a-bits": often([None, 4, 8], [9]),
    "--calib-samples": often([1, 2], [0]),
    "--calib-seqlen": often([16], [1, 10**6]),
    "--eta": often([None, 2.0, 64], [0.5, "nan"]),
    "--prefix-ids": often([None, "1", "1,2"], ["x", "100000"]),
    "--dynamic-act-clip": often([None, "0.9", "0.8,down_in=0.7"], ["0", "0.8,nowhere=0.7"]),
    "--seqlen": often([16], [1]),
})


@SETTINGS
@given(flags=QUANTIZE, gptq=st.booleans())
def test_quantize_combinations(flags, gptq, tiny_dir, text_file, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("q") / "out.json"
    res = main_cli(capsys, "quantize", "--model", tiny_dir, "--calib-data", text_file, "--eval-data", text_file,
                   "--grid-samples", "1", "--max-windows", "1", "--no-fp", *_flags(flags), *(["--gptq"] if gptq else []),
                   "--json", str(out))
    _check(res, out, "quantize")


def test_both_outcomes_happened():
    """The examples above ran whole commands (exit 0) as well as refused ones (exit 2)."""
    if not all(OUTCOMES.values()):
        pytest.skip("run with the property tests above")
    assert all(o == {0, 2} for o in OUTCOMES.values()), OUTCOMES
