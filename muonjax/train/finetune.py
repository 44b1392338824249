"""Fine-tuning: a run that starts from the parameters of another run's newest
complete checkpoint (--init-from RUN_DIR), with a fresh optimizer state or,
with --init-optimizer-state, that run's (paper Sec. 3.4 fine-tunes Muon- and
AdamW-pretrained models with either optimizer)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from muonjax.models import ModelConfig
from muonjax.models.hf import CheckpointError, from_hf, hf_config, is_hf_checkpoint
from muonjax.train.checkpoint import latest_step, read_arrays, run_checkpoints
from muonjax.train.config import FREE_MODEL_FIELDS, INHERITED, TrainConfig
from muonjax.train.errors import ConfigError
from muonjax.train.rundir import read_run_config
from muonjax.train.step import TrainState
from muonjax.train.tokenizer import BPE_FILE


@dataclasses.dataclass(frozen=True)
class Source:
    """The run, or Hugging Face checkpoint, a fine-tune starts from."""

    path: pathlib.Path
    config: dict  # its config.json (a checkpoint's: {"model": its ModelConfig as JSON})
    train: TrainConfig | None  # None for a Hugging Face checkpoint
    step: int | None  # its newest complete checkpoint; None for a Hugging Face checkpoint

    @property
    def is_hf(self) -> bool:
        return self.train is None

    def summary(self) -> dict:
        if self.is_hf:
            return {"path": str(self.path.absolute()), "format": "huggingface"}
        return {
            "path": str(self.path.absolute()),
            "step": self.step,
            "optimizer": self.train.optimizer,
            "data_fingerprint": self.config.get("data", {}).get("fingerprint"),
        }


def inherit_from_source(config_fields: dict) -> dict:
    """The TrainConfig fields given (e.g. `given_fields(args)`), with --preset,
    --model, --tokenizer and --bpe-vocab-size taken from the --init-from run
    where not given (from a Hugging Face checkpoint: its model, and its
    tokenizer); unchanged without init_from."""
    if not config_fields.get("init_from"):
        return dict(config_fields)
    path = pathlib.Path(config_fields["init_from"])
    if is_hf_checkpoint(path):
        model = {
            k: v
            for k, v in dataclasses.asdict(_hf_model(path)).items()
            if k not in FREE_MODEL_FIELDS
        }
        given_model = config_fields.get("model") or {}
        return {"tokenizer": "checkpoint", **config_fields, "model": {**model, **given_model}}
    source = read_run_config(path, "--init-from")["train"]
    return {**{k: source[k] for k in INHERITED if k in source}, **config_fields}


def _hf_model(path: pathlib.Path) -> ModelConfig:
    try:
        return hf_config(path)
    except CheckpointError as e:
        raise ConfigError(f"--init-from {e}") from None


def load_source(config: TrainConfig) -> Source:
    """The --init-from run, checked against `config` (its tokenizer, and its
    optimizer when the optimizer state is kept); ConfigError otherwise."""
    path = pathlib.Path(config.init_from)
    if is_hf_checkpoint(path):
        return _hf_source(config, path)
    saved = read_run_config(path, "--init-from")
    train = TrainConfig.from_json(saved["train"])
    step = latest_step(run_checkpoints(path))
    if step is None:
        raise ConfigError(
            f"--init-from {path} has no complete checkpoint in {run_checkpoints(path)}"
        )
    problems = []
    if train.tokenizer != config.tokenizer:
        problems.append(
            f"it used --tokenizer {train.tokenizer}, this run {config.tokenizer} "
            "(a fine-tune keeps its source's tokenizer)"
        )
    elif train.tokenizer == "bpe" and not (path / BPE_FILE).is_file():
        problems.append(f"its BPE tokenizer {path / BPE_FILE} is missing")
    elif train.tokenizer == "bpe" and train.bpe_vocab_size != config.bpe_vocab_size:
        problems.append(
            f"it used --bpe-vocab-size {train.bpe_vocab_size}, this run {config.bpe_vocab_size}"
        )
    if config.init_optimizer_state and train.optimizer != config.optimizer:
        problems.append(
            f"--init-optimizer-state needs the same optimizer, but it used {train.optimizer} "
            f"and this run {config.optimizer}"
        )
    if problems:
        raise ConfigError(f"--init-from {path}: " + "; ".join(problems))
    return Source(path=path, config=saved, train=train, step=step)


def _hf_source(config: TrainConfig, path: pathlib.Path) -> Source:
    problems = []
    if config.tokenizer != "checkpoint":
        problems.append(
            f"a Hugging Face checkpoint brings its tokenizer (--tokenizer checkpoint), not "
            f"--tokenizer {config.tokenizer}"
        )
    if config.init_optimizer_state:
        problems.append("a Hugging Face checkpoint has no optimizer state (--init-optimizer-state)")
    if problems:
        raise ConfigError(f"--init-from {path}: " + "; ".join(problems))
    model = json.loads(json.dumps(dataclasses.asdict(_hf_model(path))))
    return Source(path=path, config={"model": model}, train=None, step=None)


def check_model(source: Source, model_config) -> None:
    """The model must be the source's (but for FREE_MODEL_FIELDS): one ConfigError naming
    every differing field."""
    mine = json.loads(json.dumps(dataclasses.asdict(model_config)))  # tuples as saved: lists
    theirs = source.config["model"]
    names = (mine.keys() | theirs.keys()) - FREE_MODEL_FIELDS
    differ = sorted(k for k in names if mine.get(k) != theirs.get(k))
    if differ:
        details = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in differ)
        raise ConfigError(
            f"--init-from {source.path}: this run's model differs from that run's ({details}); "
            "give the source's --preset and --model"
        )


def _is_count(path) -> bool:
    last = path[-1]
    return getattr(last, "name", getattr(last, "key", None)) == "count"


def initial_state(source: Source, program, keep_optimizer: bool, model_config):
    """The fine-tune's step-0 TrainState on `program`'s mesh: the source checkpoint's
    params and rest (router biases), restored straight into this run's shardings;
    step and skip counters fresh; the optimizer state fresh, or with
    `keep_optimizer` the source's, whose step counts restart at 0 so that this
    run's schedule (warmup included) runs from its start. (AdamW's bias correction
    then overweights the warm moments by at most sqrt(1-b2)/(1-b1) ~ 2.2x in the
    first step, fading within ~10 steps, while warmup keeps the rate small.)"""
    if source.is_hf:
        return _hf_initial_state(source, program, model_config)
    fresh = program.init()
    abstract = program.abstract()
    wanted = {"params": abstract.params, "rest": abstract.rest}
    if keep_optimizer:
        wanted["opt_state"] = abstract.opt_state
    _, restored = read_arrays(source.path, wanted, "--init-from", step=source.step)
    opt_state = fresh.opt_state
    if keep_optimizer:
        opt_state = jax.tree_util.tree_map_with_path(
            lambda path, new, old: new if _is_count(path) else old,
            fresh.opt_state,
            restored["opt_state"],
        )
    return fresh._replace(params=restored["params"], rest=restored["rest"], opt_state=opt_state)


def _hf_initial_state(source: Source, program, model_config):
    """A fine-tune's step-0 TrainState from a Hugging Face checkpoint: its tensors
    read straight into this run's shardings, the optimizer state fresh (nothing
    else is initialized, so memory holds one model, not two)."""
    shardings = program.shardings
    try:
        model = from_hf(
            source.path,
            config=model_config,
            shardings=nnx.merge_state(shardings.params, shardings.rest),
        )
    except CheckpointError as e:
        raise ConfigError(f"--init-from {e}") from None
    _, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = jax.jit(program.tx.init, out_shardings=shardings.opt_state)(params)
    step, nonfinite, skipped = (  # three buffers: the step donates each
        jax.device_put(jnp.zeros((), jnp.int32), shardings.step) for _ in range(3)
    )
    return TrainState(step, params, rest, opt_state, nonfinite, skipped)
