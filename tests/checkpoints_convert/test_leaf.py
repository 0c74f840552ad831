"""checkpoints_convert is a leaf: no import of prefixquant_jax anywhere in it (function level included), and
importing it changes no environment variable."""
import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys

import checkpoints_convert

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in (ROOT / "checkpoints_convert").rglob("*.py"))


def _imported(tree: ast.AST) -> list[str]:
    """Every module an import statement or an importlib.import_module / __import__ call with a literal names."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def test_no_prefixquant_jax_import_anywhere():
    files = sorted((ROOT / "checkpoints_convert").rglob("*.py"))
    assert len(files) >= 8
    bad = {str(p.relative_to(ROOT)): hits for p in files
           if (hits := [m for m in _imported(ast.parse(p.read_text())) if m.split(".")[0] == "prefixquant_jax"])}
    assert bad == {}


def test_the_ast_check_sees_function_level_imports():
    tree = ast.parse("def f():\n    from prefixquant_jax.errors import UserError\n    import importlib\n"
                     "    return importlib.import_module('prefixquant_jax.model')\n")
    assert [m for m in _imported(tree) if m.startswith("prefixquant_jax")] == ["prefixquant_jax.errors",
                                                                              "prefixquant_jax.model"]


def test_fresh_import_loads_no_prefixquant_jax_and_sets_no_environment():
    """Every module of the package imported in a fresh interpreter (this session's sys.modules holds everything)."""
    code = ("import importlib, json, os, sys; before = dict(os.environ); "
            f"[importlib.import_module(m) for m in {MODULES!r}]; "
            "print(json.dumps({'env': dict(os.environ) == before, "
            "'ours': sorted(m for m in sys.modules if m.split('.')[0] == 'prefixquant_jax')}))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {"env": True, "ours": []}


def test_reload_changes_no_environment(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    before = dict(os.environ)
    importlib.reload(checkpoints_convert)
    assert dict(os.environ) == before
