"""What every finding's script shares: the scale ladder and its command line,
a ledger of training runs keyed by their config, seeds and their statistics,
results.json, the side-by-side table row and the figures' conventions.

A script is a `Finding`: its scales' settings, its protocol as TrainConfig
fields per run (trained through `train_seeds` / `Ledger.train`, rates chosen by
`sweep_rates` on seed means), its tables and its figure; `Finding.main` is its
command line. A run already in the ledger is not trained again, a run stopped
half-way resumes from its last checkpoint, so a killed sweep relaunched with the
same command trains only what is missing. On several hosts every process runs
the script and trains each run on the whole mesh; process 0 writes."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The scale ladder: cpu trains here in tens of minutes; gpu, on one GPU, runs of
# minutes each; pod, the paper's sizes on a mesh. --quick shrinks any of them to
# toy sizes (the test suite runs gpu and pod so, on 8 simulated CPU devices).
SCALES = ("cpu", "gpu", "pod")

# Two-sided 95% critical values of Student's t by degrees of freedom (n - 1).
_T95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def arguments(name: str, doc: str, argv=None) -> argparse.Namespace:
    """--scale cpu|gpu|pod, --quick (toy sizes), --dry-run (the configs and their
    memory, no training), --mesh (default: every device on data), --out (default
    results/NAME/SCALE, or results/NAME/SCALE-quick: never committed)."""
    first = doc.strip().splitlines()[0] if doc else None
    parser = argparse.ArgumentParser(description=first)
    parser.add_argument("--scale", choices=SCALES, default="cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes, end to end in a minute")
    parser.add_argument("--dry-run", action="store_true", help="report configs and memory only")
    parser.add_argument("--mesh", default=None, help="the mesh runs train on (default data=all)")
    parser.add_argument("--out", help="results folder (default: results/NAME/SCALE)")
    parser.add_argument("--budget", type=float, metavar="MINUTES",
                        help="start no run that would end after this many minutes (by the "
                        "longest run so far): for a machine lent for minutes; relaunch to go on")  # fmt: skip
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "results" / name / (args.scale + ("-quick" if args.quick else "")))
    return args


@dataclasses.dataclass(frozen=True)
class Finding:
    """A finding's script, as its command line runs it. `setup(scale, quick,
    devices)`: the scale's protocol (a dict; its "seeds", if one list); `configs(args,
    setup)`: {name: TrainConfig} for --dry-run; `train(args, ledger, setup)`: every
    run of the protocol through the ledger, and what the script computes from them
    ({"runs": [...], "analysis": ..., ...}); `markdown(results)`: its tables;
    `plot(results, path)`: its figure."""

    name: str
    doc: str
    paper: dict
    setup: Callable
    configs: Callable
    train: Callable
    markdown: Callable
    plot: Callable

    def main(self, argv=None) -> int:
        """Trains what the ledger lacks; process 0 prints the tables and writes
        results.json and NAME.png. --dry-run writes the configs' costs only."""
        import jax

        args = arguments(self.name, self.doc, argv)
        setup, started = self.setup(args.scale, args.quick, jax.device_count()), time.perf_counter()
        results = {"paper": self.paper, "scale": args.scale, "quick": args.quick}
        if args.dry_run:
            path = write_results(
                args.out, dict(results, dry_run=dry_run(self.configs(args, setup)))
            )
            print(f"wrote {path}")
            return 0
        ledger = Ledger(args.out, budget=None if args.budget is None else 60 * args.budget)
        if "seeds" in setup:
            results["seeds"] = list(setup["seeds"])
        try:
            results.update(self.train(args, ledger, setup), devices=jax.device_count())
        except BudgetSpent as stopped:
            print(f"--budget {args.budget:g} min spent before {stopped}: {len(ledger.records)} "
                  f"runs in {ledger.path}; relaunch to go on")  # fmt: skip
            return 0
        results.update(wall_time_s=time.perf_counter() - started,
                       training_time_s=sum(r["wall_time_s"] for r in results["runs"]))  # fmt: skip
        if not ledger.lead:
            return 0
        print(self.markdown(results))
        path, png = write_results(args.out, results), pathlib.Path(args.out) / f"{self.name}.png"
        self.plot(results, png)
        print(f"wrote {path} and {png}")
        return 0

    def command(self) -> None:
        """The script's `__main__`: JAX started (8 simulated devices for --scale pod
        --quick), then `main`, whose status is the exit code."""
        import sys

        options = arguments(self.name, self.doc, sys.argv[1:])
        start_jax(8 if options.scale == "pod" and options.quick else 1)
        sys.exit(self.main())


def start_jax(devices: int = 1) -> None:
    """For a script's `__main__`, before JAX's backend starts: `devices` simulated
    CPU devices when there is no accelerator (a pod's mesh, simulated), none
    skipped otherwise; and a scratch persistent compilation cache (unless
    JAX_COMPILATION_CACHE_DIR names one), which turns the compiles a sweep
    repeats into loads."""
    import atexit
    import tempfile

    import jax

    from muonjax.parallel.cluster import simulate_cpu_devices
    from muonjax.parallel.tpu import skip_absent_tpu

    skip_absent_tpu()
    simulate_cpu_devices(devices)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache is None:
        cache = tempfile.mkdtemp(prefix="muonjax-experiment-jax-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# --- the ledger ------------------------------------------------------------------------


def run_key(config, root: pathlib.Path | None = None) -> str:
    """The ledger's key of a run: a hash of everything its config computes from
    (where it is written and how it reports progress left out; data and the run
    fine-tuned from, inside the ledger's `root`, by their paths relative to it, so
    a ledger moved or copied to another machine keeps its keys)."""
    fields = {k: v for k, v in config.to_json().items() if k not in ("out", "progress")}
    if root is not None:
        fields["data"] = [_relative(p, root) for p in fields["data"]]
        if fields.get("init_from"):  # a fine-tune of a run of the same ledger
            fields["init_from"] = _relative(fields["init_from"], root)
    return _hash(fields)


def _relative(path: str, root: pathlib.Path) -> str:
    inside = pathlib.Path(path).resolve().is_relative_to(root.resolve())
    return os.path.relpath(pathlib.Path(path).resolve(), root.resolve()) if inside else path


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class BudgetSpent(Exception):
    """The next run would not end within --budget: the ledger keeps what was trained."""


class Ledger:
    """OUT/ledger.json: {key: record} of every run trained, and OUT/runs/KEY/, each
    run's directory (checkpoints, metrics.jsonl): what a relaunch resumes from.
    With `budget` (seconds), a run that the longest run so far says would end
    after it is not started: BudgetSpent."""

    def __init__(self, out: str | os.PathLike, log=print, budget: float | None = None):
        import jax

        self.out, self.log = pathlib.Path(out), log
        self.path = self.out / "ledger.json"
        self.lead = jax.process_index() == 0
        self.records = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.deadline = None if budget is None else time.monotonic() + budget
        self.longest = 0.0  # of the runs this process trained

    def _over_budget(self) -> bool:
        import jax

        over = self.deadline is not None and time.monotonic() + self.longest > self.deadline
        if jax.process_count() > 1:  # every process stops where process 0 does
            from jax.experimental import multihost_utils

            over = bool(multihost_utils.broadcast_one_to_all(over))
        return over

    def train(self, fields: dict, name: str, measure=None) -> dict:
        """The record of the run of TrainConfig `fields`: from the ledger, or
        trained (resumed if it was stopped half-way) and recorded. `measure(run_dir,
        summary)` adds the script's own numbers (read from the run's files) to it.
        A run that diverges is recorded with status "diverged" and no losses."""
        from muonjax.train import TrainConfig, TrainingStopped, run

        key = run_key(TrainConfig(**fields), self.out)
        if key in self.records:
            return self.records[key]
        if self._over_budget():
            raise BudgetSpent(name)
        run_dir = self.out / "runs" / key
        config = TrainConfig(**{**fields, "out": str(run_dir), "progress": False})
        started = time.perf_counter()
        resume = (run_dir / "checkpoints").is_dir()
        if not resume and run_dir.exists() and self.lead:
            shutil.rmtree(run_dir)  # stopped before its first checkpoint: start again
        try:
            summary = run(config, resume=resume, log=lambda *_: None)
        except TrainingStopped:
            record = {"status": "diverged", "final_eval_loss": None, "eval_loss": None}
        else:
            record = {"status": "done", **_numbers(summary)}
            if measure is not None:
                record.update(measure(run_dir, summary))
        record.update(name=name, key=key, fields=fields, resumed=resume,
                      wall_time_s=time.perf_counter() - started)  # fmt: skip
        self.longest = max(self.longest, record["wall_time_s"])
        self.records[key] = record
        if self.lead:
            write_json(self.path, self.records)
        loss = record["final_eval_loss"]
        said = (
            "diverged" if record["status"] == "diverged" else "-" if loss is None else f"{loss:.4f}"
        )
        self.log(f"{name}: {said} "
                 f"({record['wall_time_s']:.0f} s{', resumed' if resume else ''})")  # fmt: skip
        return record

    def tokenized(self, fields: dict) -> dict:
        """`fields` reading their text from shards written once into OUT/data/KEY
        (`muonjax tokenize`), so that a sweep tokenizes (and trains its BPE) once,
        not once per run."""
        from muonjax.train import TrainConfig
        from muonjax.train.config import TOKENIZATION_FIELDS
        from muonjax.train.shards import write_shards

        config = TrainConfig(**fields)
        making = {k: getattr(config, k) for k in ("data", "corpus", *TOKENIZATION_FIELDS)}
        folder = self.out / "data" / _hash(making)
        if self.lead and not folder.exists():
            write_shards(config, folder, log=self.log)
        wait_for_lead("muonjax_sweep_tokenized")
        return {**{k: v for k, v in fields.items() if k != "corpus"}, "data": (str(folder),)}


def wait_for_lead(name: str) -> None:
    """On several processes: each waits here until all arrive (after the lead wrote)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _numbers(summary) -> dict:
    keys = ("final_eval_loss", "eval_loss", "loss", "flops", "model_flops", "optimizer_flops",
            "tokens", "steps", "tokens_per_s")  # fmt: skip
    return {k: getattr(summary, k) for k in keys}


def write_json(path: pathlib.Path, data) -> None:
    """Written whole: to a temporary file, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def dry_run(configs: dict) -> dict:
    """{name: TrainConfig} -> {name: its config, parameters, FLOPs and per-device
    memory (muonjax.train.costs.step_costs, compiled from shapes; nothing trains)}."""
    from muonjax.parallel.mesh import run_mesh
    from muonjax.train.costs import step_costs

    report = {}
    for name, config in configs.items():
        mesh = run_mesh(config.mesh, config.batch_size, config.grad_accum)
        costs = step_costs(config.replace(tokenizer="byte"), mesh)  # shapes: no BPE to train
        report[name] = {"config": config.to_json(), **costs}
        print(f"{name}: {costs['peak_bytes'] / 2**30:.2f} GiB/device, {config.steps} steps x "
              f"{config.batch_size} x {config.seq_len}", flush=True)  # fmt: skip
    return report


# --- a run's parameters ----------------------------------------------------------------


def params_at(run_dir, step: int | None = None) -> dict:
    """The parameters of a run's checkpoint at `step` (default: the newest
    complete one), as a nested dict of NumPy arrays (checkpoint.read_state)."""
    from muonjax.train.checkpoint import read_state

    return read_state(pathlib.Path(run_dir), step)["params"]


def checkpoint_steps(run_dir) -> list[int]:
    """The steps of a run's checkpoint folders, oldest first."""
    from muonjax.train.checkpoint import run_checkpoints, step_folders

    return sorted(step_folders(run_checkpoints(pathlib.Path(run_dir))))


def leaves_by_group(params: dict) -> dict[str, list]:
    """{group: [arrays]} over the hidden matrices of a params tree, by the paper's
    Table 1 groups (muonjax.models.spectra): the leaves Muon orthogonalizes."""
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


# --- seeds -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over seeds (or of paired differences) with its spread."""

    mean: float
    std: float  # sample standard deviation (0 for one value)
    n: int
    half_width: float  # of the 95% confidence interval (Student's t); inf for one value
    values: tuple[float, ...]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.4f} (1 seed)"
        return f"{self.mean:+.4f} ± {self.half_width:.4f} (n={self.n})"


def estimate(values) -> Estimate:
    values = tuple(float(v) for v in values)
    n = len(values)
    if n == 0:  # e.g. every seed diverged: nothing to compare
        return Estimate(math.nan, math.nan, 0, math.inf, ())
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = _t95(n - 1) * std / math.sqrt(n) if n > 1 else math.inf
    return Estimate(mean, std, n, half, values)


def _t95(df: int) -> float:
    return _T95[max(d for d in _T95 if d <= df)] if df < 30 else 1.96


def paired(a: dict, b: dict) -> Estimate:
    """a - b over the seeds both have ({seed: value})."""
    seeds = sorted(set(a) & set(b))
    return estimate(a[s] - b[s] for s in seeds)


def verdict(difference: Estimate, paper_sign: int) -> str:
    """reproduced: the 95% interval of the difference lies on the paper's side of
    0 (`paper_sign` +1 or -1); not reproduced: on the other side; else inconclusive."""
    if difference.n < 2:
        return "inconclusive"
    lo, hi = difference.mean - difference.half_width, difference.mean + difference.half_width
    if lo > 0 or hi < 0:
        return "reproduced" if (lo > 0) == (paper_sign > 0) else "not reproduced"
    return "inconclusive"


# --- results, tables, figures ------------------------------------------------------------


def write_results(out: str | os.PathLike, results: dict) -> pathlib.Path:
    """OUT/results.json, with the scale and the time it was written."""
    path = pathlib.Path(out) / "results.json"
    write_json(path, {**results, "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return path


def table_row(*cells) -> str:
    """A markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def figure(rows: int, cols: int, size: tuple[float, float]):
    """A figure of rows x cols axes, as plt.subplots gives them, for `save`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size)


def save(fig, path, results: dict, what: str, detail: str, legends=None) -> None:
    """Every axis gridded; a legend on each of `legends` (default: every axis with
    labels) that has none yet; titled with the finding, the scale and `detail`;
    written and closed."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3, which="both")
    for ax in fig.axes if legends is None else legends:
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{what} ({results['scale']}{', quick' if results['quick'] else ''}): {detail}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def error_bars(ax, xs, estimates, label=None, **style):
    """Means with 95% intervals over seeds (a point without an interval for one seed)."""
    ys = [e.mean for e in estimates]
    spans = [0.0 if e.n < 2 else e.half_width for e in estimates]
    return ax.errorbar(xs, ys, yerr=spans, label=label, **{"capsize": 3, "marker": "o", **style})


def paper_line(ax, value: float, label: str = "paper", horizontal: bool = True):
    """The paper's value as a dashed reference line."""
    draw = ax.axhline if horizontal else ax.axvline
    return draw(value, color="0.4", linestyle="--", linewidth=1, label=label)


# --- learning-rate grids -----------------------------------------------------------------


def ladder(lo: float, hi: float, per_decade: int = 4) -> tuple[float, ...]:
    """Learning rates 10^(k / per_decade) from `lo` to `hi`, to 3 significant digits."""
    k0, k1 = round(math.log10(lo) * per_decade), round(math.log10(hi) * per_decade)
    return tuple(float(f"{10 ** (k / per_decade):.3g}") for k in range(k0, k1 + 1))


RATES = ladder(1e-6, 1.0)  # the quarter-decade grid every rate sweep runs on


def dense_model(d: int, layers: int, heads: int, mlp: float = 2.75) -> dict:
    """--model of a dense, full-MHA Llama-style size: SwiGLU of width mlp x d
    rounded to 8 (2.75: the paper's Table 2 models)."""
    return dict(d_model=d, n_layers=layers, first_k_dense=layers, n_heads=heads, attention="mha",
                head_dim=d // heads, intermediate_size=round(mlp * d / 8) * 8)  # fmt: skip


def train_seeds(ledger: Ledger, fields, seeds, name: str, measure=None, **tags):
    """Each seed's run of TrainConfig `fields(seed)` (text tokenized once where it
    uses BPE), tagged with `tags` and its seed; and their mean final_eval_loss
    (None if a seed diverged)."""
    runs = []
    for seed in seeds:
        f = fields(seed)
        f = ledger.tokenized(f) if f.get("tokenizer") == "bpe" else f
        runs.append(dict(ledger.train(f, f"{name} seed {seed}", measure), seed=seed, **tags))
    losses = [r["final_eval_loss"] for r in runs]
    return runs, None if None in losses else sum(losses) / len(losses)


def sweep_rates(loss, start, extend: bool = True) -> dict:
    """{rate: loss(rate)} over the `start` rates, then on along RATES past an
    edge while the best is at one (`extend`)."""
    losses = {lr: loss(lr) for lr in start}
    while extend and (lr := next_rate(losses, RATES)) is not None:
        losses[lr] = loss(lr)
    return losses


def rate_means(runs, seeds, **match) -> dict:
    """{rate: mean final_eval_loss over `seeds`} of the runs whose tags match; None
    where a seed diverged or is missing."""
    runs = [r for r in runs if all(r.get(k) == v for k, v in match.items())]
    means = {}
    for lr in sorted({r["learning_rate"] for r in runs}):
        done = {r["seed"]: r["final_eval_loss"] for r in runs if r["learning_rate"] == lr}
        ok = all(done.get(s) is not None for s in seeds)
        means[lr] = sum(done[s] for s in seeds) / len(seeds) if ok else None
    return means


def best_rate(losses: dict) -> float | None:
    """The rate of the least loss ({rate: loss, None if it diverged})."""
    return min((lr for lr in losses if losses[lr] is not None), key=losses.get, default=None)


def next_rate(losses: dict, rates: tuple[float, ...]) -> float | None:
    """The next rate of a sweep on the grid `rates` ({rate: loss, None if it
    diverged}): one step beyond the best when the best is at the edge of those
    tried (and the grid goes on), else None: the best is inside."""
    done = {lr: v for lr, v in losses.items() if v is not None}
    if not done:
        return None
    best, tried = min(done, key=done.get), sorted(losses)
    i = rates.index(best)
    if best == tried[0] and i > 0:
        return rates[i - 1]
    if best == tried[-1] and i + 1 < len(rates):
        return rates[i + 1]
    return None
