"""Package layering ([N]): no import cycle between our modules (imports inside functions included), the two
leaves import nothing of prefixquant_jax, the command line sits on top, at most ~10 loose modules at the top.

Read from the source with `ast` (every `import` / `from ... import` anywhere in a module), plus one fresh
interpreter per leaf to see what importing it really loads."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("prefixquant_jax", "pallas_kernels", "checkpoints_convert")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """Our modules that `path` imports anywhere (module level, functions, classes): `from a.b import c` is an
    import of a.b.c when that is a module, else of a.b."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_no_import_cycle(graph):
    """Depth-first search for a back edge; the cycle found is printed in full."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("leaf", ["pallas_kernels", "checkpoints_convert"])
def test_leaves_import_nothing_of_ours(graph, leaf):
    bad = sorted((m, n) for m, deps in graph.items() if m.split(".")[0] == leaf for n in deps
                 if n.split(".")[0] != leaf)
    assert bad == [], bad


@pytest.mark.parametrize("leaf", ["pallas_kernels", "checkpoints_convert"])
def test_leaf_loads_nothing_of_ours(leaf):
    code = f"import sys, json; import {leaf}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    mods = json.loads(out.splitlines()[-1])
    assert leaf in mods and [m for m in mods if m.split(".")[0] == "prefixquant_jax"] == []


def test_command_line_is_on_top(graph):
    """Nothing of the library imports the command line or the flat API (they import it)."""
    top = {"prefixquant_jax", "prefixquant_jax.api"}
    bad = sorted((m, n) for m, deps in graph.items() for n in deps
                 if (n.startswith("prefixquant_jax.cli") and not m.startswith("prefixquant_jax.cli"))
                 or (n in top and m not in top and not m.startswith("prefixquant_jax.cli")))
    assert bad == [], bad


def test_few_loose_modules_at_the_top():
    loose = sorted(p.name for p in (ROOT / "prefixquant_jax").glob("*.py"))
    assert len(loose) <= 10, loose


def test_one_decoder():
    """rms_norm, rope and attention are defined once (nn/decoder.py); runtime/ has no per-layer forward."""
    defs = {}
    for m, p in _modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef):
                defs.setdefault(node.name, []).append(m)
    for name in ("rms_norm", "rope_tables", "apply_rope", "attention"):
        assert defs[name] == ["prefixquant_jax.nn.decoder"], (name, defs[name])
    runtime = {n for n, ms in defs.items() for m in ms if m.startswith("prefixquant_jax.runtime")}
    assert not runtime & {"layer", "hidden", "forward", "prefill", "decode_step"}, runtime
