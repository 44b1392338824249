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
import orbax.checkpoint as ocp
from flax import nnx

from muonjax.models import ModelConfig
from muonjax.models.hf import CheckpointError, from_hf, hf_config, is_hf_checkpoint
from muonjax.train import checkpoint
from muonjax.train.config import CHECKPOINT_DIR, ConfigError, TrainConfig, read_run_config
from muonjax.train.step import TrainState
from muonjax.train.tokenizer import BPE_FILE

# Set by the source run's config and taken as they are when not given.
INHERITED = ("preset", "model", "tokenizer", "bpe_vocab_size")
# Model fields a fine-tune may change: they compute the same function of the
# same parameters (precision, recomputation, the MoE dispatch kernel).
FREE_MODEL_FIELDS = frozenset({"dtype", "remat", "moe_dispatch"})


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

    def describe(self) -> dict:
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


def _checkpoints(path: pathlib.Path) -> pathlib.Path:
    return path / CHECKPOINT_DIR


def latest_step(directory: pathlib.Path) -> int | None:
    """The newest complete checkpoint in `directory` (None if none); writes nothing."""
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(
        directory.absolute(), options=ocp.CheckpointManagerOptions(create=False)
    )
    try:
        return manager.latest_step()
    finally:
        manager.close()


def load_source(config: TrainConfig) -> Source:
    """The --init-from run, checked against `config` (its tokenizer, and its
    optimizer when the optimizer state is kept); ConfigError otherwise."""
    path = pathlib.Path(config.init_from)
    if is_hf_checkpoint(path):
        return _hf_source(config, path)
    saved = read_run_config(path, "--init-from")
    train = TrainConfig.from_json(saved["train"])
    step = latest_step(_checkpoints(path))
    if step is None:
        raise ConfigError(f"--init-from {path} has no complete checkpoint in {_checkpoints(path)}")
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


def read_arrays(
    path: pathlib.Path, wanted: dict, flag: str, *, step: int | None = None, log=print
) -> tuple[int, dict]:
    """(step, arrays): the arrays `wanted` ({"params": ..., "rest": ..., ...} of
    ShapeDtypeStructs with shardings) restored from the run `path`'s checkpoint
    `step`, straight into those shardings; without `step`, from its newest
    checkpoint that restores (checkpoint.restore_newest: each newer one that does
    not is named in one warning line through `log`, and left as it is). Reads
    only, so a run that is training may be read. ConfigError if there is no such
    checkpoint or it does not restore."""
    directory = _checkpoints(path).absolute()
    if step is None:
        return _read_newest(path, directory, wanted, flag, log)
    if step not in checkpoint.step_folders(directory):
        raise ConfigError(f"{flag} {path}: no checkpoint {step} (there: {_steps_there(directory)})")
    arrays, failure = checkpoint.attempt_restore(_reader(wanted, directory), step)
    if failure is None:
        return step, arrays
    if not (directory / str(step)).exists():
        raise ConfigError(
            f"{flag} {path}: checkpoint {step} was deleted while it was read (a run that "
            f"trains keeps only its newest checkpoints; there now: {_steps_there(directory)})"
        )
    raise ConfigError(f"{flag} {path}: checkpoint {step} does not restore ({failure})")


def _read_newest(path, directory, wanted, flag, log) -> tuple[int, dict]:
    """read_arrays without a step: the newest checkpoint that restores."""
    found = checkpoint.restore_newest(
        directory, lambda: checkpoint.step_folders(directory), _reader(wanted, directory), flag
    )
    if found is None:
        raise ConfigError(f"{flag} {path}: no complete checkpoint yet")
    step, arrays, damaged = found
    for bad, why in damaged:
        log(
            f"warning: checkpoint {bad} in {directory} does not restore ({why}); "
            f"read {step} instead, left the run as it is"
        )
    return step, arrays


def _reader(wanted: dict, directory: pathlib.Path):
    """step -> the arrays `wanted` of that checkpoint's train state (any error raised)."""

    def read(step: int) -> dict:
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(
                directory / str(step) / "state",
                args=ocp.args.PyTreeRestore(
                    item=wanted,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                    partial_restore=True,
                ),
            )

    return read


def _steps_there(directory: pathlib.Path) -> str:
    return ", ".join(map(str, sorted(checkpoint.step_folders(directory)))) or "none"


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
