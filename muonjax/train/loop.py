"""A training run: data, model and optimizer set up from a TrainConfig, the step
loop with logging, evaluation and checkpoints, and exact resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import signal
import statistics
import time

import jax
import numpy as np

from muonjax.models import flops_per_token, param_counts, svd_entropy_by_group
from muonjax.parallel.mesh import describe, make_mesh, parse_mesh
from muonjax.train import checkpoint, finetune, pipeline
from muonjax.train.config import CHECKPOINT_DIR, CONFIG_FILE, ConfigError, TrainConfig, save_json
from muonjax.train.data import RunData, load_data
from muonjax.train.lock import RunLock, is_lock_file
from muonjax.train.metrics import METRICS_FILE, MetricsWriter
from muonjax.train.preemption import StopOnSignal
from muonjax.train.program import build, check_batch
from muonjax.train.step import param_groups


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps in a row)."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT: the run saved a checkpoint after its current step and stopped."""


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `run` returns: the run's final numbers and where its outputs are."""

    out: str
    steps: int  # steps done, over all starts of the run
    loss: float | None  # last logged training loss
    eval_loss: float | None  # last evaluation
    tokens: int  # tokens trained on, over all starts of the run
    flops: float  # training FLOPs (model forward+backward, PaLM's count) for those tokens
    wall_time_s: float  # of this start, set-up and compilation included
    tokens_per_s: float | None  # median over logged intervals (after the first step)
    skipped_steps: int  # non-finite steps whose update was dropped
    metrics_path: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _saved_config(out: pathlib.Path, resume: bool) -> dict | None:
    """config.json of the run in `out` when resuming; refuses to touch a used `out` otherwise."""
    path = out / CONFIG_FILE
    if not resume:
        if out.exists() and (
            not out.is_dir() or any(not is_lock_file(p.name) for p in out.iterdir())
        ):
            raise ConfigError(
                f"--out {out} already exists; pass --resume to continue that run, or choose a new --out"
            )
        return None
    if not path.exists():
        raise ConfigError(
            f"--resume: nothing to resume in {out} (no {CONFIG_FILE}); start it without --resume"
        )
    return json.loads(path.read_text())


def _check_resumable(config: TrainConfig, saved: dict, data: dict) -> None:
    saved_train = TrainConfig.from_json(saved["train"])
    changed = config.resume_changes(saved_train)
    if changed:
        details = ", ".join(
            f"{n}: {getattr(saved_train, n)!r} -> {getattr(config, n)!r}" for n in changed
        )
        raise ConfigError(f"--resume: {config.out} was trained with another config ({details})")
    if saved["data"]["fingerprint"] != data["fingerprint"]:
        raise ConfigError(
            f"--resume: the training text differs from the one {config.out} was started on"
        )


@dataclasses.dataclass
class _Run:
    """A run set up: directories checked, data loaded, program built, config.json written."""

    config: TrainConfig
    out: pathlib.Path
    resume: bool
    data: RunData
    program: object
    model_config: object
    lead: bool  # this process writes the run's files
    initial: object = None  # a fine-tune's step-0 TrainState (finetune.initial_state)


def _set_up(config: TrainConfig, resume: bool, log) -> _Run:
    out = pathlib.Path(config.out)
    saved = _saved_config(out, resume)
    mesh = make_mesh(parse_mesh(config.mesh))
    check_batch(config.batch_size, mesh, config.grad_accum)
    lead = jax.process_index() == 0
    # a fine-tune starts from its source, unless it resumes from a checkpoint of its own
    own = resume and finetune.latest_step(out / CHECKPOINT_DIR) is not None
    source = finetune.load_source(config) if config.init_from and not own else None
    data = load_data(config, out, source.path if source else None)
    if saved is not None:
        _check_resumable(config, saved, data.description)
    model_config = config.model_config(vocab_size=data.tokenizer.vocab_size)
    if source is not None:
        finetune.check_model(source, model_config)
    program = build(config, model_config, mesh)
    initial = None
    if source is not None:  # restored now, so that a checkpoint that does not fit writes nothing
        initial = finetune.initial_state(source, program, config.init_optimizer_state)
    counts = param_counts(model_config)
    run_config = {
        "train": config.to_json(),
        "model": dataclasses.asdict(model_config),
        "parameters": {
            **counts,
            **{f"{g}_group": n for g, n in param_groups(program.shapes.params).items()},
        },
        "data": data.description,
        "environment": {
            "jax": jax.__version__,
            "python": platform.python_version(),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "mesh": describe(mesh),
            "platform": jax.default_backend(),
        },
    }
    if config.init_from:
        run_config["init_from"] = source.describe() if source else saved.get("init_from")
    if lead:  # everything checked: only now is anything written
        out.mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(out)
        save_json(out / CONFIG_FILE, run_config)
    log(
        f"{out}: parameters {counts['total']:,} total, {counts['active']:,} active, "
        f"{counts['total_non_embedding']:,} non-embedding"
    )
    if source is not None:
        log(f"{out}: starting from {source.path} step {source.step}")
    return _Run(config, out, resume, data, program, model_config, lead, initial)


def run(config: TrainConfig, *, resume: bool = False, log=print) -> Summary:
    """`_run` holding the run lock of `config.out` throughout: one writer per run
    directory (ConfigError, nothing written, if another run holds it)."""
    with RunLock(config.out, jax.process_index(), log):
        return _run(config, resume=resume, log=log)


def _run(config: TrainConfig, *, resume: bool = False, log=print) -> Summary:
    """Trains (or with `resume`, continues) the run `config` describes, in this
    process; returns its Summary. Raises ConfigError for bad input (nothing
    written), TrainingStopped when it diverges, Preempted on SIGTERM / SIGINT
    (after a checkpoint of the current step)."""
    started = time.perf_counter()
    r = _set_up(config, resume, log)
    program, out = r.program, r.out
    process, processes = jax.process_index(), jax.process_count()
    batches = pipeline.train_batches(
        r.data.train_tokens, config.seq_len, config.batch_size, config.seed, process, processes
    )
    ckpt = checkpoint.Checkpointer(out / CHECKPOINT_DIR, config.keep_checkpoints)
    restored = ckpt.restore_latest(program.abstract(), log) if resume else None
    if restored is None:
        state = program.init() if r.initial is None else r.initial
        if resume:
            log(f"{out}: no complete checkpoint yet; starting again from step 0")
    else:
        latest, state, meta = restored
        batches.set_state(meta["data"])
        log(f"{out}: resumed from step {latest} on mesh {describe(program.mesh)}")
    start = int(state.step)
    meta = {"config": config.to_json(), "data_fingerprint": r.data.description["fingerprint"]}
    save = lambda step: ckpt.save(step, state, {**meta, "step": step, "data": batches.get_state()})
    to_device = lambda rows: jax.make_array_from_process_local_data(program.batch, rows)
    validation = [
        to_device(b)
        for b in pipeline.eval_batches(
            r.data.validation_tokens,
            config.seq_len,
            config.batch_size,
            config.eval_batches,
            process,
            processes,
        )
    ]
    writer = MetricsWriter(out, resume_step=start if resume else None) if r.lead else None
    bar = _progress(config, start, enabled=r.lead and config.progress)
    last = {"loss": None, "eval_loss": None}
    rates = []
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_step = flops_per_token(r.model_config, config.seq_len) * tokens_per_step
    spectra_every = config.svd_entropy_every
    if spectra_every and not resume:  # step 0: the initialization, or a fine-tune's source
        _log_svd_entropy(writer, 0, state.params)
    clock, timed_steps = None, 0
    done = start
    try:
        with StopOnSignal() as signals:
            for step in range(start, config.steps):
                state, metrics = program.step(state, to_device(next(batches)))
                done = step + 1
                nonfinite = int(state.nonfinite)  # waits for the step
                if clock is None:  # time from the end of the first (compiling) step on
                    clock, timed_steps = time.perf_counter(), 0
                else:
                    timed_steps += 1
                if done % config.log_every == 0 or done == config.steps:
                    record = jax.device_get(metrics)
                    record["tokens"] = done * tokens_per_step
                    record["flops"] = done * flops_per_step
                    if timed_steps:
                        record["tokens_per_s"] = (
                            tokens_per_step * timed_steps / (time.perf_counter() - clock)
                        )
                        rates.append(record["tokens_per_s"])
                        clock, timed_steps = time.perf_counter(), 0
                    last["loss"] = float(record["loss"])
                    if writer:
                        writer.write(done, record)
                    bar.update(done - bar.n)
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}"
                    )
                if spectra_every and (done % spectra_every == 0 or done == config.steps):
                    _log_svd_entropy(writer, done, state.params)
                if done % config.eval_every == 0 or done == config.steps:
                    value = float(np.mean([program.eval(state, b) for b in validation]))
                    last["eval_loss"] = value
                    if writer:
                        writer.write(done, {"eval_loss": value})
                if nonfinite >= config.max_nonfinite:
                    ckpt.wait()
                    raise TrainingStopped(
                        f"stopped at step {done}: {nonfinite} steps in a row had a non-finite loss or gradient "
                        f"(updates skipped); the last good checkpoint is step {ckpt.latest_step()} in {out / CHECKPOINT_DIR}"
                    )
                checkpoint_due = done % config.checkpoint_every == 0 or done == config.steps
                if checkpoint_due and nonfinite == 0:
                    save(done)
                if signals.stop_requested():
                    if ckpt.latest_step() != done:
                        save(done)
                    ckpt.wait()
                    name = signal.Signals(signals.received or signal.SIGTERM).name
                    raise Preempted(
                        f"{name} received: stopped after step {done} of {config.steps} and saved "
                        f"{out / CHECKPOINT_DIR / str(done)}; continue with: muonjax train --out {out} --resume"
                    )
            ckpt.wait()
    finally:
        ckpt.close()
        bar.close()
        if writer:
            writer.close()
    return Summary(
        out=str(out),
        steps=done,
        loss=last["loss"],
        eval_loss=last["eval_loss"],
        tokens=done * tokens_per_step,
        flops=float(done * flops_per_step),
        wall_time_s=time.perf_counter() - started,
        tokens_per_s=statistics.median(rates) if rates else None,
        skipped_steps=int(state.skipped),
        metrics_path=str(out / METRICS_FILE),
    )


# jitted once for every run: on the params where they lie, stacks split over their mesh axes
_svd_entropy_by_group = jax.jit(svd_entropy_by_group)


def _log_svd_entropy(writer: MetricsWriter | None, step: int, params) -> None:
    """A metrics line of the mean SVD entropy per group of the paper's Figure 4
    (svd_entropy_AttnQO, ...); every process computes it, the lead writes it."""
    by_group = jax.device_get(_svd_entropy_by_group(params))
    if writer:
        writer.write(step, {f"svd_entropy_{g}": h for g, h in by_group.items()})


def _progress(config: TrainConfig, start: int, enabled: bool):
    from tqdm import tqdm

    # disable=None: a live bar on a terminal, nothing when stderr is a file or pipe
    return tqdm(
        total=config.steps,
        initial=start,
        disable=None if enabled else True,
        desc=config.optimizer,
        unit="step",
    )
