"""--resume past a damaged newest checkpoint (issue 12, item 4): it falls back to
the newest one that restores, with one warning line, keeps the damaged one
(renamed, never deleted), and resumes bit-identically to a resume from that
checkpoint; if none restores, one clear error (exit code 2 on the CLI)."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_run

from muonjax.train import ConfigError, read_metrics, run

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

QUIET = dict(log=lambda *_: None)


def _config(corpus, out, steps):
    return tiny_run(
        corpus, out, steps=steps, decay_steps=6, eval_every=2, checkpoint_every=2, warmup_steps=1
    )


def _losses(out):
    return [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """A run stopped after step 4, with checkpoints 2 and 4, stored aside. Every
    test works on a fresh copy at the run's own path (--resume checks `out`)."""
    base = tmp_path_factory.mktemp("damaged")
    run(_config(corpus, base / "run", steps=4), **QUIET)
    assert sorted(p.name for p in (base / "run" / "checkpoints").iterdir()) == ["2", "4"]
    shutil.copytree(base / "run", base / "stored")
    return base


def _fresh(source):
    out = source / "run"
    shutil.rmtree(out)
    shutil.copytree(source / "stored", out)
    return out


@pytest.fixture(scope="module")
def reference(corpus, source):
    """Losses of an undamaged copy resumed from checkpoint 2 (4 taken out of it) to step 6."""
    out = _fresh(source)
    shutil.rmtree(out / "checkpoints" / "4")
    run(_config(corpus, out, steps=6), resume=True, **QUIET)
    return _losses(out)


def _array_file(step_dir):
    """The biggest array data file orbax (OCDBT) wrote for the train state."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _damage(kind, step_dir):
    """Damages `step_dir`; returns a check that the damage is still there in the kept copy."""
    if kind == "truncated":
        f = _array_file(step_dir)
        rel, size = f.relative_to(step_dir), f.stat().st_size // 2
        with open(f, "r+b") as h:
            h.truncate(size)
        return lambda kept: (kept / rel).stat().st_size == size
    if kind == "garbage":
        f = _array_file(step_dir)
        rel, garbage = f.relative_to(step_dir), os.urandom(f.stat().st_size)
        f.write_bytes(garbage)
        return lambda kept: (kept / rel).read_bytes() == garbage
    if kind == "no_metadata":
        (step_dir / "state" / "_METADATA").unlink()
        return lambda kept: (
            (kept / "state").is_dir() and not (kept / "state" / "_METADATA").exists()
        )
    if kind == "no_state":
        shutil.rmtree(step_dir / "state")
        return lambda kept: (kept / "meta").is_dir() and not (kept / "state").exists()
    if kind == "empty":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
        return lambda kept: kept.is_dir() and not any(kept.iterdir())
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "no_metadata", "no_state", "empty"])
def test_resume_skips_a_damaged_newest_checkpoint(corpus, source, reference, kind):
    out = _fresh(source)
    still_damaged = _damage(kind, out / "checkpoints" / "4")
    lines = []
    summary = run(_config(corpus, out, steps=6), resume=True, log=lines.append)
    assert summary.steps == 6
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, lines
    assert "checkpoint 4 in" in warnings[0] and "resuming from 2" in warnings[0]
    assert "\n" not in warnings[0]
    assert any("resumed from step 2" in line for line in lines), lines
    assert _losses(out) == reference  # bit-identical to a resume from an intact checkpoint 2
    kept = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("4.damaged-")]
    assert len(kept) == 1 and still_damaged(kept[0])  # set aside, never deleted
    assert kept[0].name in warnings[0]
    # the resumed run saved step 4 (and 6) again, and a further resume restores from 6
    assert {"4", "6"} <= {p.name for p in (out / "checkpoints").iterdir()}
    lines.clear()
    run(_config(corpus, out, steps=6), resume=True, log=lines.append)
    assert not [line for line in lines if line.startswith("warning:")]
    assert any("resumed from step 6" in line for line in lines), lines


def test_no_checkpoint_restores_is_one_clear_error(source):
    out = _fresh(source)
    _damage("no_state", out / "checkpoints" / "4")
    _damage("empty", out / "checkpoints" / "2")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "muonjax", "train", "--out", str(out), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error) == 1, result.stderr
    assert error[0].startswith("muonjax: error: --resume: no checkpoint in")
    assert str(out / "checkpoints") in error[0] and "restores" in error[0]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing renamed


def test_no_checkpoint_restores_via_the_python_api(corpus, source):
    out = _fresh(source)
    _damage("truncated", out / "checkpoints" / "4")
    _damage("no_metadata", out / "checkpoints" / "2")
    with pytest.raises(ConfigError, match="no checkpoint in .* restores"):
        run(_config(corpus, out, steps=6), resume=True, **QUIET)
