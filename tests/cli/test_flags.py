"""Every flag is checked where it is declared ([R]): each numeric flag of every subcommand has a range (cli/args.py
`number` / `option`, the latter the option dataclass's own Range), each path flag a kind, and a value out of range
is refused while the flags are parsed, before anything is loaded, with one line naming the flag, the value and the
allowed range.

The parser walk tries every subcommand x every numeric flag x {0, -1, nan, inf, 1e30, x}: a value the parser
refuses must give exit 2 and one `error:` line naming the flag; a value it accepts is run for real on the tiny
model and must end in exit 0, or exit 2 with one `error:` line; never a traceback."""
import argparse

import pytest

from prefixquant_jax.cli.main import build_parser
from prefixquant_jax.options import FlatOptions, QuantizeOptions, TrainConfig, field_range
from tests.cli.util import assert_one_line_error, main_cli

BAD = ("0", "-1", "nan", "inf", "1e30", "x")


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def numeric_actions():
    """(subcommand, flag, its Range) of every flag whose type carries a Range."""
    out = []
    for cmd, sub in _subparsers(build_parser()).items():
        for a in sub._actions:
            r = getattr(a.type, "range", None)
            if r is not None and a.option_strings:
                out.append((cmd, a.option_strings[-1], r))
    return out


def test_every_numeric_flag_has_a_range():
    """No flag parses numbers without its range (a bare int / float type would let 0, nan or inf through)."""
    bare = [(cmd, a.option_strings) for cmd, sub in _subparsers(build_parser()).items() for a in sub._actions
            if a.type in (int, float)]
    assert bare == []
    assert len(numeric_actions()) >= 40


def test_flags_share_the_options_ranges():
    """The flags that set an option field use that field's Range: one source for the library and the CLI."""
    by_flag = {(cmd, flag): r for cmd, flag, r in numeric_actions()}
    assert by_flag[("quantize", "--eta")] == field_range(QuantizeOptions, "eta")
    assert by_flag[("quantize", "--gptq-damp")] == field_range(QuantizeOptions, "gptq_damp")
    assert by_flag[("quantize", "--lr-quant")] == field_range(TrainConfig, "lr_quant")
    assert by_flag[("quantize", "--flat-lr")] == field_range(FlatOptions, "lr")
    with pytest.raises(ValueError, match="QuantizeOptions.eta must be a number > 1"):
        QuantizeOptions(eta=0.5)


def base_args(cmd, tiny_dir, text_file, tmp):
    """Arguments that make `cmd` a short, complete run on the tiny model."""
    data = ("--seqlen", "16", "--max-windows", "1")
    return {
        "eval": ["--model", tiny_dir, "--data", text_file, *data],
        "generate": ["--model", tiny_dir, "--prompt", "hi", "--max-new-tokens", "2", "--no-chat"],
        "analyze": ["--model", tiny_dir, "--calib-data", text_file, "--calib-seqlen", "16", "--outlier-samples", "2"],
        "quantize": ["--model", tiny_dir, "--preset", "w4a4kv4-dynamic", "--calib-data", text_file, "--calib-samples",
                     "2", "--calib-seqlen", "16", "--grid-samples", "1", "--eval-data", text_file, "--no-fp", *data],
        "export-hf": ["--model", tiny_dir, "--out", str(tmp / "hf")],
        "export-prefix": [],
        "lm-eval": ["--model", tiny_dir, "--tasks", "lambada_wikitext2", "--limit", "2", "--bootstrap-iters", "0"],
        "plan": ["--model", "llama-3-8b"],
    }[cmd]


# flags that only act together with others: what a real run of the flag needs
NEEDS = {"--train-samples": ("--train",), "--train-seqlen": ("--train",), "--epochs": ("--train",),
         "--train-batch-size": ("--train",), "--lr-quant": ("--train",), "--lr-weight": ("--train",),
         "--ckpt-every": ("--train",), "--gptq-damp": ("--gptq",), "--flat-lr": ("--preset", "flatquant-w4a4kv4"),
         "--flat-alpha": ("--preset", "flatquant-w4a4kv4"), "--process-id": ("--num-processes", "1")}
TRAIN = ("--train-samples", "2", "--train-seqlen", "16", "--epochs", "1", "--train-batch-size", "2")


def _accepted(r, value) -> bool:
    try:
        r.parse(value)
        return True
    except ValueError:
        return False


CASES = [(cmd, flag, r, v) for cmd, flag, r in numeric_actions() for v in BAD]


@pytest.mark.parametrize("cmd,flag,r,value", [c for c in CASES if not _accepted(c[2], c[3])],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_refused_while_parsing(cmd, flag, r, value, tiny_dir, text_file, tmp_path, capsys):
    res = main_cli(capsys, cmd, *base_args(cmd, tiny_dir, text_file, tmp_path), flag, value)
    assert_one_line_error(res, flag)
    line = [l for l in res.stderr.splitlines() if l.startswith("error:")][0]
    assert f"got '{value}'" in line and r.describe() in line, line


def _default_run(case):
    """`--seed 0` is the default seed every other CLI test runs with: those runs are slow-only (the parse check of
    the seeds' other values stays in test_refused_while_parsing)."""
    return pytest.param(*case, marks=pytest.mark.slow) if case[1] == "--seed" and case[3] == "0" else case


@pytest.mark.parametrize("cmd,flag,r,value", [_default_run(c) for c in CASES if _accepted(c[2], c[3])],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_accepted_values_run_without_a_traceback(cmd, flag, r, value, tiny_dir, text_file, tmp_path, capsys):
    """What the parser lets through, the command takes: a result, or one `error:` line (e.g. lr 1e30 diverges)."""
    args = [cmd, *base_args(cmd, tiny_dir, text_file, tmp_path)]
    extra = list(NEEDS.get(flag, ()))
    if extra[:1] == ["--preset"]:  # FlatQuant trains: a small budget
        args[args.index("--preset") + 1] = extra[1]
        extra = list(TRAIN)
    elif extra == ["--train"]:
        extra += TRAIN  # the flag under test comes last: argparse keeps the last value
    res = main_cli(capsys, *args, *extra, flag, value, "--json", str(tmp_path / "out.json"))
    assert "Traceback" not in res.stderr
    if res.returncode == 0:
        assert (tmp_path / "out.json").is_file()
    else:
        assert_one_line_error(res, "")


@pytest.mark.parametrize("cmd,flag,value,what", [
    ("eval", "--data", "no/such/file.txt", "not an existing file"),
    ("eval", "--import-prefix", "no/such/prefix.safetensors", "not an existing file"),
    ("quantize", "--resume", "no/such/dir", "not an existing directory"),
    ("lm-eval", "--include-path", "no/such/dir", "not an existing directory"),
    ("eval", "--json", ".", "is a directory"),
    ("eval", "--eval-log", "/etc/passwd/x.jsonl", "not a directory"),
])
def test_path_kinds(cmd, flag, value, what, tiny_dir, text_file, tmp_path, capsys):
    args = [a for a in base_args(cmd, tiny_dir, text_file, tmp_path)]
    assert_one_line_error(main_cli(capsys, cmd, *args, flag, value), what)
