"""CLI: bad input gives one line `error: ...` and exit status 2, never a traceback; eval JSON fields."""
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300, devices=None):
    """`prefixquant ARGS` in a subprocess; devices=N: on N CPU devices (XLA_FLAGS set, or removed for 1)."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    if devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("XLA_FLAGS", None)
        if devices > 1:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", "prefixquant_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_error(r, pattern):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert pattern.lower() in lines[0].lower(), lines[0]


def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("eval", "--model", str(tmp_path / "nope")), "does not exist")


def test_non_llama_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_one_line_error(run_cli("eval", "--model", str(tmp_path)), "not a Llama")


def test_corrupt_safetensors(tmp_path, tiny_dir):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    assert_one_line_error(run_cli("eval", "--model", str(bad)), "cannot read safetensors")


def test_seqlen_above_max_positions(tiny_dir):
    assert_one_line_error(run_cli("eval", "--model", tiny_dir, "--seqlen", "4096"), "max positions")


def test_text_shorter_than_window(tiny_dir, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("just a few words")
    assert_one_line_error(run_cli("eval", "--model", tiny_dir, "--data", str(f), "--seqlen", "64"), "fewer than one window")


def test_unknown_dtype(tiny_dir):
    assert_one_line_error(run_cli("eval", "--model", tiny_dir, "--dtype", "float16"), "invalid choice")


def test_non_utf8_data(tiny_dir, tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00 binary")
    assert_one_line_error(run_cli("eval", "--model", tiny_dir, "--data", str(f), "--seqlen", "64"), "not UTF-8")


def test_eval_json(tiny_dir, tmp_path):
    from tests.conftest import TINY_TEXT
    f = tmp_path / "t.txt"
    f.write_text(TINY_TEXT)
    out = tmp_path / "r.json"
    r = run_cli("eval", "--model", tiny_dir, "--data", str(f), "--seqlen", "32", "--max-windows", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("ppl", "windows", "seqlen", "tokens", "model", "seconds"):
        assert key in res
    assert res["windows"] == 3 and res["seqlen"] == 32 and res["tokens"] == 96
    assert 1.0 < res["ppl"] < 10 * 320  # a random model: finite, above 1


def test_generate_runs(tiny_dir):
    r = run_cli("generate", "--model", tiny_dir, "--prompt", "The quick", "--max-new-tokens", "5", "--no-chat")
    assert r.returncode == 0, r.stderr[-2000:]


def test_export_hf_refuses_to_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "exp"
    r = run_cli("export-hf", "--model", tiny_dir, "--out", str(out), "--rotate")
    assert r.returncode == 0, r.stderr[-2000:]
    before = (out / "model.safetensors").read_bytes()
    assert_one_line_error(run_cli("export-hf", "--model", tiny_dir, "--out", str(out)), "already exists")
    assert (out / "model.safetensors").read_bytes() == before  # nothing the user had is lost
