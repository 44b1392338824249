"""A training run: data, model and optimizer set up from a TrainConfig, the step
loop with logging, evaluation and checkpoints, and exact resume."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import platform
import signal
import statistics
import time

import jax
import numpy as np

from muonjax.models import flops_per_token, param_counts, svd_entropy_by_group
from muonjax.models.memory import TooLarge, check_fits, is_out_of_memory
from muonjax.parallel.mesh import format_mesh, run_mesh
from muonjax.train import checkpoint, costs, finetune, pipeline
from muonjax.train.config import TrainConfig
from muonjax.train.data import RunData, load_data
from muonjax.train.errors import EXIT_PREEMPTED, ConfigError, WriteFailed
from muonjax.train.lock import RunLock, is_lock_file
from muonjax.train.metrics import MetricsWriter, read_metrics
from muonjax.train.preemption import StopOnSignal
from muonjax.train.program import build
from muonjax.train.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    read_run_config,
    save_json,
)
from muonjax.train.step import param_groups

# float32 copies of the parameters that training holds at least: the parameters, their
# gradients and the optimizer's moments (Muon's momentum; AdamW's two). The muon recipe's
# AdamW group has two, but one for every parameter keeps it a lower bound: a model that
# fits is never refused.
MOMENT_COPIES = {"muon": 1, "adamw": 2}


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
    final_eval_loss: float | None  # the end-of-run evaluation (--final-eval-tokens)
    tokens: int  # tokens trained on, over all starts of the run
    flops: float  # training FLOPs for those tokens: model_flops + optimizer_flops
    model_flops: float  # the model's forward and backward (PaLM's count)
    optimizer_flops: float  # Newton-Schulz (Muon; 0 for AdamW)
    wall_time_s: float  # of this start, set-up and compilation included
    tokens_per_s: float | None  # median over logged intervals (after the first step)
    skipped_steps: int  # non-finite steps whose update was dropped
    metrics_path: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _saved_config(out: pathlib.Path, resume: bool) -> dict | None:
    """config.json of the run in `out` when resuming; refuses to touch a used `out` otherwise."""
    if not resume:
        if out.exists() and (
            not out.is_dir() or any(not is_lock_file(p.name) for p in out.iterdir())
        ):
            raise ConfigError(
                f"--out {out} already exists; pass --resume to continue that run, or choose a new --out"
            )
        return None
    if not (out / CONFIG_FILE).exists():
        raise ConfigError(
            f"--resume: nothing to resume in {out} (no {CONFIG_FILE}); start it without --resume"
        )
    return read_run_config(out)


def _resumed_config(config: TrainConfig, saved: dict, data: dict, log) -> TrainConfig:
    """`config` checked against the run it resumes: what it computes must be the
    same (paths are compared by what they hold, see config.LOCATIONS), except the
    RECOVERY fields, whose changes are logged. An unset --decay-steps keeps the
    saved schedule."""
    saved_train = TrainConfig.from_json(saved["train"])
    if config.decay_steps is None:  # a --steps 0 run has no schedule yet: this start sets it
        horizon = saved_train.schedule_steps or config.steps
        config = config.replace(decay_steps=max(horizon, saved_train.warmup_steps))
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
    out = pathlib.Path(config.out)
    for name, (before, after) in config.recovery_changes(saved_train).items():
        log(f"{out}: {name} {before} -> {after} from here on (recorded in {CONFIG_FILE})")
    if config.steps > config.schedule_steps:
        log(
            f"{out}: the learning-rate schedule ends at step {config.schedule_steps} "
            f"(--decay-steps); steps after it keep its final rate (pass --decay-steps to change it)"
        )
    return config


def _start_record(config: TrainConfig, saved: dict | None, step: int, skip_batches: int) -> dict:
    """This start's entry in config.json's "history": when, from which step, to how
    many steps, and what a resume changed."""
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step}
    record["steps"] = config.steps
    changes = config.recovery_changes(TrainConfig.from_json(saved["train"])) if saved else {}
    if changes:
        record["changes"] = changes
    if skip_batches:
        record["skipped_batches"] = skip_batches
    return record


@dataclasses.dataclass
class _PreparedRun:
    """A run set up: directories checked, data loaded, program built, the state
    initialized or restored, config.json written."""

    config: TrainConfig
    out: pathlib.Path
    data: RunData
    program: object
    model_config: object
    lead: bool  # this process writes the run's files
    ckpt: checkpoint.Checkpointer
    state: object  # the TrainState training starts from
    data_state: dict | None  # the data iterator's, from the checkpoint resumed from


def _set_up(
    config: TrainConfig, resume: bool, resume_from: int | None, skip_batches: int, log
) -> _PreparedRun:
    """The run set up (see _PreparedRun): everything checked first, then built and
    restored, then config.json and the tokenizer written."""
    out = pathlib.Path(config.out)
    saved = _saved_config(out, resume)
    mesh = run_mesh(config.mesh, config.batch_size, config.grad_accum)
    lead = jax.process_index() == 0
    latest = checkpoint.latest_step(out / CHECKPOINT_DIR) if resume else None
    target = resume_from if resume_from is not None else latest
    # a fine-tune starts from its source, unless it resumes from a checkpoint of its own
    source = finetune.load_source(config) if config.init_from and target is None else None
    # before the data is read (a BPE or the shards' check take seconds): the model less
    # the vocabulary the tokenizer will set, a lower bound; checked again once it is known
    vocab = config.model.get("vocab_size", 1)
    _check_memory(config, config.model_config().replace(vocab_size=vocab), mesh)
    data = load_data(config, out, source.path if source else None)
    config = _settled_config(config, saved, data, log)
    ckpt = checkpoint.Checkpointer(out / CHECKPOINT_DIR, config.keep_checkpoints)
    _check_start(config, data, ckpt, resume_from, target, skip_batches)
    model_config = config.model_config(vocab_size=data.tokenizer.vocab_size)
    if source is not None:
        finetune.check_model(source, model_config)
    _check_memory(config, model_config, mesh)
    program = build(config, model_config, mesh)
    restored = _restore(ckpt, program, resume, resume_from, log)
    state, data_state = _starting_state(restored, source, program, config, model_config)
    run_config = _run_config(config, model_config, program, data, saved, source)
    run_config["history"].append(_start_record(config, saved, int(state.step), skip_batches))
    if lead:  # everything checked (a restore may have set checkpoints aside): now files
        _write_run_files(out, run_config, data)
    resumed_step = restored[0] if restored is not None else None
    _log_start(out, run_config["parameters"], source, resumed_step, program, resume, log)
    return _PreparedRun(config, out, data, program, model_config, lead, ckpt, state, data_state)


def _settled_config(config: TrainConfig, saved: dict | None, data: RunData, log) -> TrainConfig:
    """`config` as this start runs it: checked against the run it resumes, or
    with its learning-rate schedule's length fixed."""
    if saved is not None:
        return _resumed_config(config, saved, data.description, log)
    if config.decay_steps is None and config.steps:  # fixed now, so that a longer --resume
        # keeps the schedule; a --steps 0 run (set up and saved, no schedule) leaves it open
        return config.replace(decay_steps=max(config.steps, config.warmup_steps))
    return config


def _restore(ckpt: checkpoint.Checkpointer, program, resume: bool, resume_from, log):
    """(step, TrainState, metadata) of the checkpoint this start resumes from:
    `resume_from`, or with `resume` the newest complete one; None if none."""
    if resume_from is not None:
        return ckpt.restore_step(resume_from, program.abstract(), log)
    return ckpt.restore_latest(program.abstract(), log) if resume else None


def _starting_state(restored, source, program, config: TrainConfig, model_config):
    """The TrainState training starts from and its data iterator's state (None:
    from the start): the checkpoint restored, a fine-tune's source, or a fresh
    initialization."""
    if restored is not None:
        _, state, meta = restored
        return state, meta["data"]
    if source is not None:  # restored now, so that a checkpoint that does not fit writes nothing
        state = finetune.initial_state(source, program, config.init_optimizer_state, model_config)
        return state, None
    return program.init(), None


def _write_run_files(out: pathlib.Path, run_config: dict, data: RunData) -> None:
    """config.json and the tokenizer, in `out` (made if new); WriteFailed if they cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        # config.json first: a run killed after it is one that --resume continues
        save_json(out / CONFIG_FILE, run_config)
        data.tokenizer.save(out)
    except OSError as e:
        raise WriteFailed(f"writing {out / CONFIG_FILE} failed: {e}") from e


def _log_start(out: pathlib.Path, counts: dict, source, resumed_step, program, resume, log):
    """The lines that open a start: its parameter counts, and where it starts from."""
    log(
        f"{out}: parameters {counts['total']:,} total, {counts['active']:,} active, "
        f"{counts['total_non_embedding']:,} non-embedding"
    )
    if source is not None:
        what = "(a Hugging Face checkpoint)" if source.is_hf else f"step {source.step}"
        log(f"{out}: starting from {source.path} {what}")
    if resumed_step is not None:
        log(f"{out}: resumed from step {resumed_step} on mesh {format_mesh(program.mesh)}")
    elif resume:
        log(f"{out}: no complete checkpoint yet; starting again from step 0")


def _check_start(
    config: TrainConfig,
    data: RunData,
    ckpt: checkpoint.Checkpointer,
    resume_from: int | None,
    target: int | None,
    skip_batches: int,
) -> None:
    """What this start asks for, checked before anything is built: the step it
    resumes from (`target`) within --steps, and --skip-batches within one pass
    over the training data."""
    if resume_from is not None and resume_from not in ckpt.all_steps():
        target = None  # no such checkpoint: restore_step says so, naming the ones there
    if target is not None and target > config.steps:
        raise ConfigError(
            f"--resume: {config.out} is at step {target} already, past --steps {config.steps}; "
            f"pass --steps {target} or more"
        )
    most = pipeline.batches_per_pass(data.train_tokens, config.seq_len, config.batch_size)
    if skip_batches > most:
        raise ConfigError(
            f"--skip-batches {skip_batches} is more than one pass over the training data: "
            f"at most {most} (batches of {config.batch_size} x {config.seq_len + 1} tokens)"
        )


def _check_memory(config: TrainConfig, model_config, mesh: jax.sharding.Mesh) -> None:
    """ConfigError, before anything is built, when the parameters, gradients and
    optimizer moments (MOMENT_COPIES) cannot fit in the devices' memory together."""
    if not config.memory_check:
        return
    copies = 2 + MOMENT_COPIES[config.optimizer]
    what = (
        f"training the model with --optimizer {config.optimizer} (its parameters, gradients "
        "and optimizer moments)"
    )
    try:
        check_fits(model_config, list(mesh.devices.flat), copies=copies, what=what)
    except TooLarge as e:
        raise ConfigError(
            f"{e}; choose a smaller model (--preset, --model), or pass --no-memory-check to "
            "try anyway"
        ) from None


def _run_config(config, model_config, program, data: RunData, saved, source) -> dict:
    """config.json's content: the resolved run, its parameter counts, data and
    environment, and the history of the starts before this one."""
    run_config = {
        "train": config.to_json(),
        "model": dataclasses.asdict(model_config),
        "parameters": {
            **param_counts(model_config),
            **{f"{g}_group": n for g, n in param_groups(program.shapes.params).items()},
        },
        "data": data.description,
        "environment": {
            "jax": jax.__version__,
            "python": platform.python_version(),
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "mesh": format_mesh(program.mesh),
            "platform": jax.default_backend(),
        },
        "history": list((saved or {}).get("history", [])),
    }
    if config.init_from:
        run_config["init_from"] = source.summary() if source else saved.get("init_from")
    return run_config


def run(
    config: TrainConfig,
    *,
    resume: bool = False,
    resume_from: int | None = None,
    skip_batches: int = 0,
    log=print,
) -> Summary:
    """Trains (or with `resume`, continues) the run `config` describes, in this
    process; returns its Summary.

    `resume_from`: continue from that checkpoint (not the newest; the newer ones
    are set aside, never deleted), and `skip_batches`: skip the next that many
    training batches after the checkpoint; with a lower `config.learning_rate`,
    the standard recovery from a divergence. Both imply `resume`, and are
    recorded in config.json's "history".

    Holds the run lock of `config.out` throughout (one writer per run
    directory), and handles SIGTERM / SIGINT from set-up to the last file
    closed: until its first step is done a signal ends the process at once
    (exit 75, nothing to save: see _SetUpWindow), after it the run stops after
    its current step. Raises ConfigError for bad input (nothing written), also
    for a model or batch that does not fit the devices (found before anything is
    written, or by XLA in set-up or the first step: config.json may be written
    then), TrainingStopped when it diverges, Preempted on SIGTERM / SIGINT
    (after a checkpoint of the current step), WriteFailed when its files cannot
    be written (disk full).
    """
    if skip_batches < 0:
        raise ConfigError(f"--skip-batches must be >= 0, got {skip_batches}")
    if resume_from is not None and resume_from < 0:
        raise ConfigError(f"--resume-from must be a step >= 0, got {resume_from}")
    resume = resume or resume_from is not None or skip_batches > 0
    with StopOnSignal() as signals, RunLock(config.out, jax.process_index(), log) as lock:
        with _SetUpWindow(signals, lock, resume) as window:
            return _run(config, resume, resume_from, skip_batches, signals, window, log)


class _SetUpWindow:
    """From the start of set-up to the end of the first step, while the run has
    nothing to save: SIGTERM / SIGINT end the process at once (one line, exit 75),
    also in the middle of an XLA compilation or a restore, so that compiling a
    large model never outlasts a preemption's grace period; and XLA's
    RESOURCE_EXHAUSTED is bad input (the model or batch does not fit the
    devices), a ConfigError. What the window writes is written whole or not at
    all (config.json, the tokenizer and the trimmed metrics.jsonl are renamed
    into place, as are the checkpoints a restore sets aside; a TensorBoard file
    cut short reads up to the cut, and a metrics.abandoned-*.jsonl cut short is
    written again by the relaunch, before metrics.jsonl is trimmed), and the run
    lock dies with the process (the clean-up removes it), so an exit at any
    moment loses nothing.

    Multi-host: a process exits where it gets the signal. Schedulers signal
    every host; a process that got none stops at its next collective, whose
    peers have gone."""

    def __init__(self, signals: StopOnSignal, lock: RunLock, resume: bool):
        self._command = signals.command
        again = "" if resume else " with --resume-if-exists"  # config.json may be written already
        line = lambda name: (
            f"{name} received while the run set up: stopped, nothing to save; run the same "
            f"command again{again}"
        )
        self._block = signals.at_once(
            self._message(line), code=EXIT_PREEMPTED, cleanup=lock.release
        )

    def after_set_up(self, line) -> None:
        """Set-up is done: `line(signal name)` is what a signal prints from here."""
        self._block.message = self._message(line)

    def _message(self, line):
        """`line` as an at_once message, prefixed with the command."""
        return lambda name: f"{self._command}: {line(name)}"

    def close(self) -> None:
        self._block.close()

    def __enter__(self) -> _SetUpWindow:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        was_open = self._block.open
        self.close()
        if was_open and is_out_of_memory(error):
            raise ConfigError(_does_not_fit(error)) from None


def _does_not_fit(error: Exception) -> str:
    """ConfigError's words for XLA's RESOURCE_EXHAUSTED: what ran out, and what to lower."""
    first = str(error).splitlines()[0][:300]
    return (
        f"the run does not fit in the devices' memory ({first}): lower --batch-size, raise "
        "--grad-accum (smaller micro-batches), turn on --remat, or choose a smaller model "
        "(--grad-accum and --remat may change on --resume)"
    )


def _stopped_in_set_up(name: str, start: int, config: TrainConfig, resume_from, skip_batches):
    """The line of a run that signal `name` stopped after its set-up, before it trained."""
    flags = f"--resume-from {resume_from}" if resume_from is not None else "--resume"
    if skip_batches:
        flags += f" --skip-batches {skip_batches}"
    return (
        f"{name} received while the run set up: stopped before step {start + 1} of "
        f"{config.steps}, nothing to save; continue with: muonjax train --out "
        f"{pathlib.Path(config.out)} {flags}"
    )


def _train_batches(prepared: _PreparedRun, skip_batches: int, log):
    """The training batches from where the run resumes (the checkpoint's data
    state), past the next `skip_batches`."""
    config = prepared.config
    batches = pipeline.train_batches(
        prepared.data.train_tokens,
        config.seq_len,
        config.batch_size,
        config.seed,
        jax.process_index(),
        jax.process_count(),
    )
    if prepared.data_state is not None:
        batches.set_state(prepared.data_state)
    if skip_batches:
        pipeline.skip(batches, skip_batches)
        step = int(prepared.state.step)
        log(f"{prepared.out}: skipped {skip_batches} training batches after step {step}")
    return batches


def _evaluation_batches(prepared: _PreparedRun, final: bool = False) -> list:
    """The batches, on the devices, of every evaluation of this start; or (final)
    of the end-of-run evaluation: --final-eval-tokens of text, or every held-out
    SFT example."""
    config = prepared.config
    sft = config.data_format == "sft-jsonl"
    spread = final or config.holdout == "documents"
    rows = pipeline.eval_rows(
        prepared.data.validation_tokens, config.seq_len, examples=sft and spread
    )
    n_batches = config.eval_batches
    if final:
        n_tokens = len(rows) * config.seq_len if sft else config.final_eval_tokens
        n_batches = math.ceil(n_tokens / (config.batch_size * config.seq_len))
    batches = pipeline.eval_batches(
        rows,
        config.batch_size,
        n_batches,
        jax.process_index(),
        jax.process_count(),
        spread=spread,
    )
    return [jax.make_array_from_process_local_data(prepared.program.batch, b) for b in batches]


def _metrics_writer(
    prepared: _PreparedRun, start: int, resume: bool, resume_from
) -> MetricsWriter | None:
    """The lead process's metrics.jsonl and TensorBoard writer (trimmed to `start` on resume)."""
    if not prepared.lead:
        return None
    set_aside = None
    if resume_from is not None:  # the lines after it are another branch of the run
        set_aside = f"metrics.abandoned-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    try:
        return MetricsWriter(
            prepared.out, resume_step=start if resume else None, set_aside=set_aside
        )
    except OSError as e:
        last = prepared.ckpt.last_complete()
        raise WriteFailed(f"writing {prepared.out} failed ({e}); {last}") from e


def _run(config, resume, resume_from, skip_batches, signals, window, log) -> Summary:
    """run()'s body, inside its signal handlers, run lock and set-up window:
    set up, then the steps, then every file closed, also when it fails."""
    started = time.perf_counter()
    prepared = _set_up(config, resume, resume_from, skip_batches, log)
    config, start = prepared.config, int(prepared.state.step)
    stopped = lambda name: _stopped_in_set_up(name, start, config, resume_from, skip_batches)
    window.after_set_up(stopped)
    batches = _train_batches(prepared, skip_batches, log)
    validation = _evaluation_batches(prepared)
    writer = _metrics_writer(prepared, start, resume, resume_from)
    bar = _progress(config, start, enabled=prepared.lead and config.progress)
    steps = _Steps(prepared, batches, validation, writer, bar)
    if config.svd_entropy_every and not resume:  # step 0: the initialization, or the source
        _log_svd_entropy(writer, 0, steps.state.params)
    failing = False
    try:
        if start < config.steps and signals.stop_requested():  # just before the window opened
            raise Preempted(stopped(_signal_name(signals)))
        steps.train(signals, window)
        steps.finish()
    except OSError as e:  # metrics.jsonl or TensorBoard's events: the disk is full, say
        failing = True
        raise WriteFailed(
            f"writing {prepared.out} failed ({e}); {prepared.ckpt.last_complete()}"
        ) from e
    except BaseException:
        failing = True
        raise
    finally:
        closers = [prepared.ckpt.close, bar.close, *([writer.close] if writer else [])]
        _close_all(closers, failing)
    return steps.summary(wall_time_s=time.perf_counter() - started)


class _Steps:
    """The step loop of a run set up: a batch in, then the metrics, the SVD
    entropy, the evaluation and the checkpoint that are due, and a stop on
    divergence or SIGTERM / SIGINT; counts what the Summary reports."""

    def __init__(self, prepared: _PreparedRun, batches, validation: list, writer, bar):
        self.prepared, self.config, self.ckpt = prepared, prepared.config, prepared.ckpt
        self.batches, self.validation, self.writer, self.bar = batches, validation, writer, bar
        self.state = prepared.state
        self.done = int(self.state.step)  # steps done, over all starts of the run
        logged = (
            _last_logged(prepared.out) if prepared.lead and self.done == self.config.steps else {}
        )
        self.last = {k: logged.get(k) for k in ("loss", "eval_loss", "final_eval_loss")}
        self.tokens_per_step = self.config.batch_size * self.config.seq_len
        # training FLOPs of a step: the model's forward and backward (PaLM's count)
        # and the optimizer's Newton-Schulz iterations (0 for AdamW; elementwise
        # updates are not counted)
        model_flops = flops_per_token(prepared.model_config, self.config.seq_len)
        self.model_flops_per_step = model_flops * self.tokens_per_step
        self.optimizer_flops_per_step, _ = costs.newton_schulz_costs(
            self.config, prepared.program, prepared.program.mesh
        )
        self.rates = []  # tokens/s of each logged interval
        self.clock, self.timed_steps = None, 0  # the interval timed since the last logged step
        self._meta = {
            "config": self.config.to_json(),
            "data_fingerprint": prepared.data.description["fingerprint"],
        }

    def train(self, signals: StopOnSignal, window: _SetUpWindow) -> None:
        """The steps from the run's step to --steps."""
        config, program = self.config, self.prepared.program
        spectra_every = config.svd_entropy_every
        for step in range(self.done, config.steps):
            batch = jax.make_array_from_process_local_data(program.batch, next(self.batches))
            self.state, metrics = program.step(self.state, batch)
            self.done = step + 1
            nonfinite = int(self.state.nonfinite)  # waits for the step
            window.close()  # from the first step done on, a signal stops after a step, saved
            self.ckpt.check()  # a background save that failed stops the run here
            _check_data(self.prepared.data, self.done)
            self._time_step()
            if self._due(config.log_every):
                self._log(metrics)
            if spectra_every and self._due(spectra_every):
                _log_svd_entropy(self.writer, self.done, self.state.params)
            if self._due(config.eval_every):
                self._evaluate()
            if self.done == config.steps and config.final_eval_tokens:
                self._evaluate(final=True)
            self._save_or_stop(nonfinite, signals)

    def finish(self) -> None:
        """After the last step: its checkpoint written, and the data verified."""
        if self.config.steps == 0 and self.ckpt.latest_step() is None:  # the run as set up
            self._save(0)
        self.ckpt.wait()
        _check_data(self.prepared.data, self.done, wait=True)  # exit 0 means the data was verified

    def summary(self, wall_time_s: float) -> Summary:
        """What run() returns, for the steps done so far."""
        out = self.prepared.out
        return Summary(
            out=str(out),
            steps=self.done,
            loss=self.last["loss"],
            eval_loss=self.last["eval_loss"],
            final_eval_loss=self.last["final_eval_loss"],
            tokens=self.done * self.tokens_per_step,
            **self._flops(),
            wall_time_s=wall_time_s,
            tokens_per_s=statistics.median(self.rates) if self.rates else None,
            skipped_steps=int(self.state.skipped),
            metrics_path=str(out / METRICS_FILE),
        )

    def _flops(self) -> dict[str, float]:
        """Training FLOPs of the steps done: the model's, the optimizer's, their sum."""
        model = float(self.done * self.model_flops_per_step)
        optimizer = float(self.done * self.optimizer_flops_per_step)
        return {"model_flops": model, "optimizer_flops": optimizer, "flops": model + optimizer}

    def _due(self, every: int) -> bool:
        """Whether the step just done is one of every `every`, or the last."""
        return self.config.due(self.done, every)

    def _time_step(self) -> None:
        """Time from the end of the first (compiling) step on."""
        if self.clock is None:
            self.clock, self.timed_steps = time.perf_counter(), 0
        else:
            self.timed_steps += 1

    def _log(self, metrics) -> None:
        """A metrics line: the step's metrics, tokens, FLOPs and tokens/s."""
        record = jax.device_get(metrics)
        record["tokens"] = self.done * self.tokens_per_step
        record.update(self._flops())
        if self.timed_steps:
            elapsed = time.perf_counter() - self.clock
            record["tokens_per_s"] = self.tokens_per_step * self.timed_steps / elapsed
            self.rates.append(record["tokens_per_s"])
            self.clock, self.timed_steps = time.perf_counter(), 0
        self.last["loss"] = float(record["loss"])
        if self.writer:
            self.writer.write(self.done, record)
        self.bar.update(self.done - self.bar.n)
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}"
        )

    def _evaluate(self, final: bool = False) -> None:
        """The loss over the validation batches (or the final evaluation's), logged:
        the sum over their targets over their count."""
        program, name = self.prepared.program, "final_eval_loss" if final else "eval_loss"
        batches = _evaluation_batches(self.prepared, final=True) if final else self.validation
        total, count = np.sum([np.asarray(program.eval(self.state, b)) for b in batches], axis=0)
        record = {name: float(total / max(count, 1.0))}
        if final:
            record["final_eval_tokens"] = int(count)
        self.last[name] = record[name]
        if self.writer:
            self.writer.write(self.done, record)

    def _save_or_stop(self, nonfinite: int, signals: StopOnSignal) -> None:
        """The checkpoint due after this step; TrainingStopped after --max-nonfinite
        non-finite steps in a row, Preempted (saved first) on SIGTERM / SIGINT."""
        config, ckpt, done = self.config, self.ckpt, self.done
        if nonfinite >= config.max_nonfinite:
            ckpt.wait()
            raise TrainingStopped(_diverged(config, done, nonfinite, ckpt.all_steps()))
        if self._due(config.checkpoint_every) and nonfinite == 0:
            self._save(done)
        if done < config.steps and signals.stop_requested():  # after the last: finish
            if ckpt.latest_step() != done:
                self._save(done)
            ckpt.wait()
            out = self.prepared.out
            raise Preempted(
                f"{_signal_name(signals)} received: stopped after step {done} of {config.steps} and saved "
                f"{out / CHECKPOINT_DIR / str(done)}; continue with: muonjax train --out {out} --resume"
            )

    def _save(self, step: int) -> None:
        """A checkpoint of the current state at `step`, with the data iterator's state."""
        meta = {**self._meta, "step": step, "data": self.batches.get_state()}
        self.ckpt.save(step, self.state, meta)


def _check_data(data: RunData, done: int, *, wait: bool = False) -> None:
    """The shards' verification, where it runs while the run trains (a large
    folder): its failure stops the run (`wait`: waits for it to finish)."""
    try:
        data.check(wait=wait)
    except ConfigError as e:
        raise ConfigError(
            f"{e}; stopped after step {done}: this start's steps, and the checkpoints it "
            "saved, trained on those shards"
        ) from None


def _diverged(config: TrainConfig, done: int, nonfinite: int, saved: list[int]) -> str:
    """TrainingStopped's message, with the command that goes on past the divergence."""
    message = (
        f"stopped at step {done}: {nonfinite} steps in a row had a non-finite loss, gradient "
        "or update (skipped)"
    )
    if not saved:
        return f"{message}; no checkpoint was written: start again with a lower --learning-rate"
    where, good = pathlib.Path(config.out), saved[-1]
    return (
        f"{message}. Checkpoints (finite parameters only) in {where / CHECKPOINT_DIR}: "
        f"{', '.join(map(str, saved))}. To go on from one (an earlier one if the loss rose "
        "before it) past the batches that diverged, with a lower learning rate: muonjax train "
        f"--out {where} --resume-from {good} --skip-batches {done - good} "
        f"--learning-rate {config.learning_rate / 2:g}"
    )


def _signal_name(signals: StopOnSignal) -> str:
    """SIGTERM or SIGINT: this process's, or SIGTERM when another process got it."""
    return signal.Signals(signals.received or signal.SIGTERM).name


def _last_logged(out: pathlib.Path) -> dict:
    """The last logged value of each metric (a resumed run that has nothing left to do)."""
    last = {}
    if (out / METRICS_FILE).exists():
        for record in read_metrics(out):
            last.update(record)
    return last


def _close_all(closers, failing: bool) -> None:
    """Calls each of `closers`; when the run is already failing, their errors
    (a full disk fails the flushes too) are not reported a second time."""
    for close in closers:
        try:
            close()
        except Exception:
            if not failing:
                raise


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
