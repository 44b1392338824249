"""What the paper-reproduction scripts share: their command line (--scale
cpu|pod, --quick, --out), JAX start-up, results files, and reading a run's
parameters by the paper's matrix groups."""

from __future__ import annotations

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)
    parser.add_argument("--scale", choices=("cpu", "pod"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for the test suite")
    parser.add_argument("--mesh", default="data=8", help="--scale pod: the mesh to inspect on")
    parser.add_argument("--out", help="results folder (default: results/<experiment>)")
    return parser


def arguments(name: str, doc: str, argv=None) -> argparse.Namespace:
    """--scale cpu (default: runs here) | pod (the paper's sizes: build and
    inspect the configs, do not train); --quick: end to end in under a minute;
    --out: default results/<name>, or results/<name>/scratch with --quick."""
    args = _parser(doc).parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "results" / name / ("scratch" if args.quick else ""))
    return args


def start_jax(argv=None) -> None:
    """For a script's `__main__` only, before JAX's backend starts: one CPU
    device for --scale cpu (2 cores gain nothing from more; under pytest the
    conftest's 8 stay), the --mesh's devices for --scale pod; and a scratch
    persistent compilation cache (unless JAX_COMPILATION_CACHE_DIR names one),
    which turns the compiles a sweep repeats (init, eval) into loads."""
    import atexit
    import math
    import os
    import shutil
    import sys
    import tempfile

    import jax

    from muonjax.parallel.cluster import simulate_cpu_devices
    from muonjax.parallel.mesh import parse_mesh
    from muonjax.parallel.tpu import skip_absent_tpu

    skip_absent_tpu()
    args, _ = _parser("").parse_known_args(sys.argv[1:] if argv is None else argv)
    devices = math.prod(parse_mesh(args.mesh).values()) if args.scale == "pod" else 1
    simulate_cpu_devices(devices)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache is None:
        cache = tempfile.mkdtemp(prefix="muonjax-experiment-jax-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def write_results(out: str | pathlib.Path, results: dict) -> pathlib.Path:
    """Writes OUT/results.json: `results` on top of what is there from the same
    mode (--quick or not), so that --scale pod adds its "pod" part without
    dropping the CPU runs, and the other way round."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("quick") == results.get("quick"):
            results = {**old, **results}
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def report_pod(out: str | pathlib.Path, paper: dict, quick: bool, pod: dict, table: str) -> int:
    """How every script's --scale pod ends: its table and wall time printed, and
    OUT/results.json written with the paper's numbers and the pod part."""
    print(table)
    print(f"wall time {pod['wall_time_s']:.0f} s")
    path = write_results(out, {"paper": paper, "quick": quick, "pod": pod})
    print(f"wrote {path}")
    return 0


def params_at(run_dir: str | pathlib.Path, step: int | None = None) -> dict:
    """The parameters of a run's checkpoint at `step` (default: the newest
    complete one), as a nested dict of NumPy arrays (checkpoint.read_state)."""
    from muonjax.train.checkpoint import read_state

    return read_state(pathlib.Path(run_dir), step)["params"]


def checkpoint_steps(run_dir: str | pathlib.Path) -> list[int]:
    """The steps of a run's checkpoint folders, oldest first (checkpoint.step_folders)."""
    from muonjax.train.checkpoint import run_checkpoints, step_folders

    return sorted(step_folders(run_checkpoints(pathlib.Path(run_dir))))


def matrix_group(path: tuple[str, ...]) -> str | None:
    """AttnQ / AttnKV / AttnO / Dense / Experts / SharedExperts / Router for a
    hidden matrix's path (the paper's Table 1 groups, from
    muonjax.models.spectra.MATRIX_GROUPS), None for embeddings, the head,
    norms and biases."""
    from muonjax.models.spectra import matrix_group as group

    if path[-1] in ("scale", "bias", "embedding") or path[0] in ("embed", "lm_head"):
        return None
    return group(path)


def leaves_by_group(params: dict) -> dict[str, list]:
    """{group: [arrays]} over the hidden matrices of a params tree (nested dicts
    or an nnx.State): the leaves Muon orthogonalizes, by `matrix_group`."""
    from muonjax.models.spectra import hidden_matrices

    groups: dict[str, list] = {}
    for _, group, leaf in hidden_matrices(params):
        groups.setdefault(group, []).append(leaf)
    return groups


def strip_values(tree):
    """A restored nnx state's nested dict without its {'value': array} wrappers."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return strip_values(tree["value"])
        return {k: strip_values(v) for k, v in tree.items()}
    return tree


# Learning rates in half-decade steps: the ladder a sweep extends along
RATE_LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def next_rate(losses: dict[float, float | None]) -> float | None:
    """The next learning rate of a sweep ({rate: loss, None if it diverged}, on
    RATE_LADDER): one step beyond the edge when the best rate is at the edge of
    those tried (and the ladder goes on), else None: the best is interior."""
    done = {lr: v for lr, v in losses.items() if v is not None}
    best, tried = min(done, key=done.get), sorted(losses)
    i = RATE_LADDER.index(best)
    if best == tried[0] and i > 0:
        return RATE_LADDER[i - 1]
    if best == tried[-1] and i + 1 < len(RATE_LADDER):
        return RATE_LADDER[i + 1]
    return None
