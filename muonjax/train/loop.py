"""A training run: data, model and optimizer set up from a TrainConfig, the step
loop with logging, evaluation and checkpoints, and exact resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from muonjax.models import param_counts, preset
from muonjax.parallel.mesh import describe, make_mesh, parse_mesh
from muonjax.train import checkpoint, pipeline
from muonjax.train.config import ConfigError, TrainConfig, save_json
from muonjax.train.corpus import load_corpus, split_texts
from muonjax.train.metrics import MetricsWriter
from muonjax.train.program import build, check_batch
from muonjax.train.step import param_groups
from muonjax.train.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_for_run

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps in a row)."""


@dataclasses.dataclass
class RunData:
    train_tokens: np.ndarray
    validation_tokens: np.ndarray
    tokenizer: ByteTokenizer | BPETokenizer
    description: dict


def _saved_config(out: pathlib.Path, resume: bool) -> dict | None:
    """config.json of the run in `out` when resuming; refuses to touch a used `out` otherwise."""
    path = out / CONFIG_FILE
    if not resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
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


def load_data(config: TrainConfig, out: pathlib.Path) -> RunData:
    corpus = load_corpus(config.data)
    train_texts, validation_texts = split_texts(corpus.texts, config.validation_fraction)
    tokenizer = tokenizer_for_run(config.tokenizer, out, train_texts, config.bpe_vocab_size)
    train, validation = (
        np.concatenate([np.zeros(0, np.uint8), *tokenizer.encode(t)])
        for t in (train_texts, validation_texts)
    )
    window = config.seq_len + 1
    if len(train) < config.batch_size * window:
        raise ConfigError(
            f"--data has {len(train)} training tokens, fewer than one batch of "
            f"--batch-size {config.batch_size} x (--seq-len {config.seq_len} + 1)"
        )
    if len(validation) < config.batch_size * window:
        raise ConfigError(
            f"--data leaves {len(validation)} validation tokens, fewer than one batch of "
            f"{config.batch_size} x {window}; pass more text or a larger --validation-fraction"
        )
    description = {
        **corpus.describe(),
        "tokenizer": config.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": int(len(train)),
        "validation_tokens": int(len(validation)),
    }
    return RunData(train, validation, tokenizer, description)


def train(config: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Runs (or resumes) `config`; returns a summary of the run."""
    out = pathlib.Path(config.out)
    saved = _saved_config(out, resume)
    mesh = make_mesh(parse_mesh(config.mesh))
    check_batch(config.batch_size, mesh)
    lead = jax.process_index() == 0
    data = load_data(config, out)
    if saved is not None:
        _check_resumable(config, saved, data.description)
    model_config = preset(config.preset).replace(vocab_size=data.tokenizer.vocab_size)
    program = build(config, model_config, mesh)
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
            "mesh": describe(mesh),
            "platform": jax.default_backend(),
        },
    }
    if lead:  # everything checked: only now is anything written
        out.mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(out)
        save_json(out / CONFIG_FILE, run_config)

    process, processes = jax.process_index(), jax.process_count()
    batches = pipeline.train_batches(
        data.train_tokens, config.seq_len, config.batch_size, config.seed, process, processes
    )
    ckpt = checkpoint.Checkpointer(out / CHECKPOINT_DIR, config.keep_checkpoints)
    latest = ckpt.latest_step() if resume else None
    if latest is None:
        state = program.init()
        if resume:
            log(f"{out}: no complete checkpoint yet; starting again from step 0")
    else:
        state, meta = ckpt.restore(latest, program.abstract())
        batches.set_state(meta["data"])
        log(f"{out}: resumed from step {latest} on mesh {describe(mesh)}")
    start = int(state.step)
    meta = {"config": config.to_json(), "data_fingerprint": data.description["fingerprint"]}
    to_device = lambda rows: jax.make_array_from_process_local_data(program.batch, rows)
    validation = [
        to_device(b)
        for b in pipeline.eval_batches(
            data.validation_tokens,
            config.seq_len,
            config.batch_size,
            config.eval_batches,
            process,
            processes,
        )
    ]
    writer = MetricsWriter(out, resume_step=start if resume else None) if lead else None
    bar = _progress(config, start, enabled=lead and config.progress)
    summary = {"tokens_per_s": [], "loss": None, "eval_loss": None}
    tokens_per_step = config.batch_size * config.seq_len
    clock, timed_steps = None, 0
    try:
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
                if timed_steps:
                    record["tokens_per_s"] = (
                        tokens_per_step * timed_steps / (time.perf_counter() - clock)
                    )
                    summary["tokens_per_s"].append(record["tokens_per_s"])
                    clock, timed_steps = time.perf_counter(), 0
                summary["loss"] = float(record["loss"])
                if writer:
                    writer.write(done, record)
                bar.update(done - bar.n)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}"
                )
            if done % config.eval_every == 0 or done == config.steps:
                value = float(np.mean([program.eval(state, b) for b in validation]))
                summary["eval_loss"] = value
                if writer:
                    writer.write(done, {"eval_loss": value})
            if nonfinite >= config.max_nonfinite:
                ckpt.wait()
                raise TrainingStopped(
                    f"stopped at step {done}: {nonfinite} steps in a row had a non-finite loss or gradient "
                    f"(updates skipped); the last good checkpoint is step {ckpt.latest_step()} in {out / CHECKPOINT_DIR}"
                )
            if (done % config.checkpoint_every == 0 or done == config.steps) and nonfinite == 0:
                ckpt.save(done, state, {**meta, "step": done, "data": batches.get_state()})
        ckpt.wait()
    finally:
        ckpt.close()
        bar.close()
        if writer:
            writer.close()
    return {
        "out": str(out),
        "steps": config.steps,
        "loss": summary["loss"],
        "eval_loss": summary["eval_loss"],
        "tokens_per_s": statistics.median(summary["tokens_per_s"])
        if summary["tokens_per_s"]
        else None,
        "skipped_steps": int(state.skipped),
    }


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
