"""The core install (`pip install muonjax`: jax, optax, numpy) is enough for the
optimizer; the command line without the train extra says what to install.

Each test runs a fresh interpreter whose imports of the train extra's modules
fail as they would where that extra is not installed."""

import json
import pathlib
import subprocess
import sys

import muonjax

TRAIN_EXTRA_MODULES = ["flax", "orbax", "grain", "chex", "tensorboardX", "tqdm", "tokenizers"]

# Makes every import of those modules fail, and records each attempt.
BLOCKER = f"""
import importlib.abc, sys
ATTEMPTS = []
class _NoTrainExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {TRAIN_EXTRA_MODULES!r}:
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NoTrainExtra())
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=120
    )


def test_optimizer_needs_only_the_core():
    result = _python(
        """
import jax, jax.numpy as jnp, json
import muonjax
params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
grads = {"w": jnp.arange(12.0).reshape(4, 3) / 12, "b": jnp.full((3,), 0.5)}
tx = muonjax.moonlight(1e-3)
state = tx.init(params)
updates, state = tx.update(grads, state, params)
finite = all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
changed = all(bool((u != 0).any()) for u in jax.tree.leaves(updates))
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in """
        + repr(TRAIN_EXTRA_MODULES)
        + """)
print(json.dumps({"finite": finite, "changed": changed, "attempts": ATTEMPTS, "loaded": loaded}))
"""
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"finite": True, "changed": True, "attempts": [], "loaded": []}


def test_cli_without_the_train_extra_says_what_to_install():
    result = _python(
        """
import runpy
sys.argv = ["muonjax", "train", "--help"]
runpy.run_module("muonjax", run_name="__main__")
"""
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "missing: flax" in lines[0] and "pip install 'muonjax[train]'" in lines[0], lines[0]
    assert result.stdout == ""


def test_py_typed_marker_is_in_the_package():
    assert (pathlib.Path(muonjax.__file__).parent / "py.typed").is_file()
