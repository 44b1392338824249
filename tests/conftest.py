"""Give JAX 8 CPU devices before anything starts its backend, so sharding is
real, and share compiled programs between tests (and the CLI subprocesses
they start) through a persistent compilation cache for this session."""

import atexit
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# The tests' programs are toy-sized and compile-bound: XLA's CPU backend
# skips its code optimizations (about a quarter of the suite's time), here and
# in every subprocess the tests start. What is tested is muonjax's semantics.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# The dev extra installs libtpu (to compile for TPU slices): without a TPU at
# hand, JAX would still try to start a TPU backend and libtpu would log errors.
# The tests run on the CPU, here and in every subprocess they start.
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

from muonjax.parallel.cluster import simulate_cpu_devices  # noqa: E402

simulate_cpu_devices(8)
jax.devices()  # the backend starts with its 16 threads; the processes tests start
os.environ.pop("PJRT_NPROC")  # size their own pools (most simulate no mesh)

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="muonjax-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 20 real text files (some of this Python's own stdlib) for
    --data; test modules that need more define their own."""
    from muonjax.train.corpus import load_corpus

    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(load_corpus().texts[:20]):
        (folder / f"doc{i:02d}.py").write_text(text)
    return str(folder)


# --model for CLI runs of `tiny` cut to its dense layer (see tiny_run)
DENSE = "n_layers=1,first_k_dense=1"


def tiny_run(corpus: str, out, **changes):
    """The TrainConfig of a short run of the `tiny` preset cut to its dense layer
    (an MoE layer more than doubles the compile time of tests about files,
    signals and resumes; pass model={} for the preset's MoE) on `corpus` (batches of 8 x 32,
    every step logged, no progress bar), with `changes` on top."""
    from muonjax.train import TrainConfig

    base = dict(
        out=str(out),
        model={"n_layers": 1, "first_k_dense": 1},
        data=(corpus,),
        steps=12,
        batch_size=8,
        seq_len=32,
        log_every=1,
        eval_every=6,
        checkpoint_every=4,
        warmup_steps=2,
        progress=False,
    )
    return TrainConfig(**{**base, **changes})


def load_experiment(name: str):
    """experiments/NAME.py as a module (experiments/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_experiment(name: str, out: pathlib.Path, *args: str) -> dict:
    """Runs `python experiments/NAME.py ARGS --out OUT` as a user would and
    returns its results.json. A process of its own, so that --scale cpu gets
    the one device the script asks for (twice as fast as this session's 8)."""
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / f"{name}.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def run_scale(name: str, out: pathlib.Path, scale: str) -> dict:
    """`NAME.py --scale SCALE --quick`'s results.json, its data path checked: gpu
    trains every run on one BPE tokenization written once into the sweep's
    shards; pod trains on 8 simulated devices."""
    results = run_experiment(name, out, "--scale", scale, "--quick")
    if scale == "gpu":
        assert len(list((out / "data").iterdir())) == 1
        assert all(r["fields"]["tokenizer"] == "bpe" for r in results["runs"])
    else:
        assert results["devices"] == 8
    return results


def dry_run_report(module, out: pathlib.Path) -> dict:
    """The report of `--scale pod --quick --dry-run`: every config's memory and FLOPs
    counted, and nothing trained."""
    assert module.main(["--scale", "pod", "--quick", "--dry-run", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())["dry_run"]
    for name, r in report.items():
        assert r["peak_bytes"] > 0 and r["model_flops"] > 0, name
    assert not (out / "ledger.json").exists()
    return report


# `muonjax ARGS` in a process whose MODULE.HOOK first touches READY, then blocks in the
# open() of the FIFO: a read that blocks in C, where no Python signal handler runs
_BLOCKED = """
import importlib, sys
from muonjax.cli import main
module, hook, ready, fifo = sys.argv[1:5]
module = importlib.import_module(module)
real = getattr(module, hook)
def blocked(*args, **kwargs):
    open(ready, "w").close()
    open(fifo).read()
    return real(*args, **kwargs)
setattr(module, hook, blocked)
sys.exit(main(sys.argv[5:]))
"""


def signal_while_blocked(tmp_path, module: str, hook: str, signum, args, *, before=None):
    """`muonjax ARGS` blocked in C at MODULE.HOOK (muonjax.train.loop's `build`, say)
    and sent `signum` there (after `before()`, given, checks the process as it
    stands): its exit code and stderr's lines. A process the signal does not end
    within 60 s fails the test (the hang that the watcher thread of
    muonjax.train.preemption prevents)."""
    import signal as signals
    import time

    ready, fifo = tmp_path / f"ready-{hook}", tmp_path / f"fifo-{hook}"
    os.mkfifo(fifo)
    command = [sys.executable, "-c", _BLOCKED, module, hook, ready, fifo, *map(str, args)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ready.exists():
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1]
    time.sleep(0.2)  # into the open()
    if before is not None:
        before()
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{signals.Signals(signum).name} did not end it") from None
    ready.unlink()
    fifo.unlink()
    return proc.returncode, [line for line in stderr.splitlines() if line.strip()]
