"""CLI: bad input gives one line `error: ...` and exit status 2, never a traceback; eval / generate / export-hf
in this process; the installed `prefixquant` console script once, end to end."""
import json
import shutil

import pytest

from tests.cli.util import assert_one_line_error, main_cli, run_cli


def test_missing_path(tmp_path, capsys):
    assert_one_line_error(main_cli(capsys, "eval", "--model", tmp_path / "nope"), "does not exist")


def test_non_llama_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_one_line_error(main_cli(capsys, "eval", "--model", tmp_path), "not a Llama")


def test_corrupt_safetensors(tmp_path, tiny_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    assert_one_line_error(main_cli(capsys, "eval", "--model", bad), "cannot read safetensors")


def test_gguf_unsupported_architecture(tmp_path, capsys):
    """A GGUF of an architecture we do not run (phi3) is named in one line (the loader's FormatError:
    tests/checkpoints_convert/test_gguf_families.py)."""
    from tests.checkpoints_convert.test_gguf_families import write_gguf
    from tests.conftest import make_tiny_family

    ref = make_tiny_family(tmp_path / "hf", "qwen2", tokenizer=False)
    write_gguf(tmp_path / "m.gguf", ref, "qwen2", arch="phi3")
    assert_one_line_error(main_cli(capsys, "eval", "--model", tmp_path / "m.gguf"), "architecture 'phi3'")


def test_seqlen_above_max_positions(tiny_dir, capsys):
    assert_one_line_error(main_cli(capsys, "eval", "--model", tiny_dir, "--seqlen", "4096"), "max positions")


def test_text_shorter_than_window(tiny_dir, tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("just a few words")
    assert_one_line_error(main_cli(capsys, "eval", "--model", tiny_dir, "--data", f, "--seqlen", "64"),
                          "fewer than one window")


def test_unknown_dtype(tiny_dir, capsys):
    assert_one_line_error(main_cli(capsys, "eval", "--model", tiny_dir, "--dtype", "float16"), "invalid choice")


def test_non_utf8_data(tiny_dir, tmp_path, capsys):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00 binary")
    assert_one_line_error(main_cli(capsys, "eval", "--model", tiny_dir, "--data", f, "--seqlen", "64"), "not UTF-8")


EVAL_ARGS = ("--seqlen", "32", "--max-windows", "3")


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    from tests.conftest import TINY_TEXT

    f = tmp_path_factory.mktemp("txt") / "t.txt"
    f.write_text(TINY_TEXT)
    return str(f)


def test_eval_json(tiny_dir, short_text, tmp_path, capsys):
    out = tmp_path / "r.json"
    r = main_cli(capsys, "eval", "--model", tiny_dir, "--data", short_text, *EVAL_ARGS, "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("ppl", "windows", "seqlen", "tokens", "model", "seconds", "recipe"):
        assert key in res
    assert "preset" not in res and "prefix_tokens" not in res
    assert res["recipe"] == "fp" and res["windows"] == 3 and res["seqlen"] == 32 and res["tokens"] == 96
    assert 1.0 < res["ppl"] < 10 * 320  # a random model: finite, above 1
    assert "ppl" in r.stdout


def test_console_script_end_to_end(tiny_dir, short_text, tmp_path, capsys):
    """The installed `prefixquant` entry point (pyproject [project.scripts]) in a fresh process: exit 0 and the
    perplexity the in-process CLI computes, to the bit."""
    out, ref = tmp_path / "r.json", tmp_path / "ref.json"
    r = run_cli("eval", "--model", tiny_dir, "--data", short_text, *EVAL_ARGS, "--json", out, script=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert main_cli(capsys, "eval", "--model", tiny_dir, "--data", short_text, *EVAL_ARGS, "--json", ref).returncode == 0
    assert json.loads(out.read_text())["ppl"] == json.loads(ref.read_text())["ppl"]


def test_generate_runs(tiny_dir, tmp_path, capsys):
    out = tmp_path / "g.json"
    r = main_cli(capsys, "generate", "--model", tiny_dir, "--prompt", "The quick", "--max-new-tokens", "5", "--no-chat",
                 "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["recipe"] == "fp" and 1 <= len(res["token_ids"]) <= 5


def test_export_hf_refuses_to_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    r = main_cli(capsys, "export-hf", "--model", tiny_dir, "--out", out, "--rotate")
    assert r.returncode == 0, r.stderr[-2000:]
    before = (out / "model.safetensors").read_bytes()
    assert_one_line_error(main_cli(capsys, "export-hf", "--model", tiny_dir, "--out", out), "already exists")
    assert (out / "model.safetensors").read_bytes() == before  # nothing the user had is lost
