"""Importing the library changes no environment variable (nor does the converter package it builds on)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import json, os, sys
before = dict(os.environ)
import {module}
after = dict(os.environ)
changed = {{k: [before.get(k), after.get(k)] for k in set(before) | set(after) if before.get(k) != after.get(k)}}
json.dump(changed, sys.stdout)
"""


@pytest.mark.parametrize("module", ["prefixquant_jax", "checkpoints_convert"])
def test_import_leaves_os_environ_unchanged(module):
    """A fresh interpreter (no conftest, no jax imported yet): os.environ before and after `import module`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(module=module)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {}
