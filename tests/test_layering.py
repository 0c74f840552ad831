"""Package layering ([J]): pallas_kernels is a leaf, prefixquant_jax never imports checkpoints_convert at
module level. Checked in fresh interpreters (sys.modules of this test session already holds everything)
and by reading every module's top-level imports."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_pallas_kernels_is_a_leaf():
    mods = _loaded_after("import pallas_kernels, pallas_kernels.sm90_check")
    ours = [m for m in mods if m.split(".")[0] in ("prefixquant_jax", "checkpoints_convert", "flax")]
    assert "pallas_kernels.rotate_quant" in mods  # the import did load the kernels
    assert ours == []


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """Modules imported by statements at module level (not inside functions or classes)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        stmts = [node]
        if isinstance(node, (ast.If, ast.Try)):  # e.g. `if TYPE_CHECKING:` / try-import at top level
            stmts = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        for n in stmts:
            if isinstance(n, ast.Import):
                names.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                names.add(n.module)
    return names


@pytest.mark.parametrize("package,forbidden", [
    ("prefixquant_jax", ("checkpoints_convert",)),
    ("pallas_kernels", ("prefixquant_jax", "checkpoints_convert", "flax")),
])
def test_no_module_level_import_against_the_layering(package, forbidden):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = sorted(m for m in _top_level_imports(path) if m.split(".")[0] in forbidden)
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    assert bad == {}


def test_importing_prefixquant_jax_does_not_load_checkpoints_convert():
    mods = _loaded_after("import prefixquant_jax")
    assert "prefixquant_jax" in mods and not any(m.startswith("checkpoints_convert") for m in mods)
