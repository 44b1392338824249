"""Run directories <-> Hugging Face DeepseekV3 checkpoints (`muonjax convert`), and
a trained model with its tokenizer from either (`muonjax generate`)."""

from __future__ import annotations

import pathlib

import jax
from flax import nnx

from muonjax.models import ModelConfig, abstract_model
from muonjax.models.hf import CheckpointError, from_hf, is_hf_checkpoint, to_hf
from muonjax.train.config import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    ConfigError,
    TrainConfig,
    read_run_config,
)
from muonjax.train.finetune import latest_step, restore_arrays
from muonjax.train.tokenizer import (
    BPE_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    CheckpointTokenizer,
    has_checkpoint_tokenizer,
    tokenizer_for_run,
)


def load_model(path, *, step: int | None = None, flag: str = "--run"):
    """(model, tokenizer) of a run directory's checkpoint `step` (default: its newest
    complete one) or of a Hugging Face checkpoint directory, on one device; the
    tokenizer is None for a checkpoint that ships none."""
    path = pathlib.Path(path)
    if is_hf_checkpoint(path):
        if step is not None:
            raise ConfigError(f"--step: {path} is a Hugging Face checkpoint, which has one")
        try:
            model = from_hf(path)
        except CheckpointError as e:
            raise ConfigError(f"{flag} {e}") from None
        tokenizer = CheckpointTokenizer(path) if has_checkpoint_tokenizer(path) else None
        return model, tokenizer
    saved = read_run_config(path, flag)
    train = TrainConfig.from_json(saved["train"])
    config = ModelConfig(**saved["model"])
    newest = latest_step(path / CHECKPOINT_DIR)
    if newest is None:
        raise ConfigError(f"{flag} {path}: no complete checkpoint yet")
    step = newest if step is None else step
    graphdef, params, rest = nnx.split(abstract_model(config), nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)
    wanted = {"params": jax.tree.map(on_device, params), "rest": jax.tree.map(on_device, rest)}
    restored = restore_arrays(path, step, wanted, flag)
    model = nnx.merge(graphdef, restored["params"], restored["rest"])
    if train.tokenizer == "bpe" and not (path / BPE_FILE).is_file():  # else it would train one
        raise ConfigError(f"{flag} {path}: its BPE tokenizer {path / BPE_FILE} is missing")
    try:
        tokenizer = tokenizer_for_run(train.tokenizer, path, [], train.bpe_vocab_size)
    except ValueError as e:
        raise ConfigError(f"{flag} {path}: {e}") from None
    return model, tokenizer


def run_to_hf(run, out, *, dtype: str = "float32", step: int | None = None) -> pathlib.Path:
    """Writes a run's checkpoint as a Hugging Face checkpoint in `out` (new), with
    its tokenizer's files where it has some (a BPE's tokenizer.json, or the
    checkpoint tokenizer it was fine-tuned with)."""
    run = pathlib.Path(run)
    if is_hf_checkpoint(run):
        raise ConfigError(f"--to-hf {run} is a Hugging Face checkpoint already")
    model, tokenizer = load_model(run, step=step, flag="--to-hf")
    names = (
        (tokenizer.model_file, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)
        if isinstance(tokenizer, CheckpointTokenizer)
        else (BPE_FILE,)
    )
    extra = {name: run / name for name in names if (run / name).is_file()}
    try:
        return to_hf(model, out, dtype=dtype, extra_files=extra)
    except CheckpointError as e:
        raise ConfigError(f"--to-hf {run}: {e}") from None


def hf_to_run_config(directory, out, **flags) -> TrainConfig:
    """The TrainConfig of `muonjax convert --from-hf`: a run of 0 steps that starts
    from the checkpoint, so that training saves it as the run's step 0 (with a
    fresh optimizer state, the config, and the tokenizer)."""
    from muonjax.train.finetune import inherit_from_source

    if not is_hf_checkpoint(directory):
        where = pathlib.Path(directory) / CONFIG_FILE
        raise ConfigError(
            f"--from-hf {directory}: not a Hugging Face checkpoint (needs {where} with a "
            "model_type, and model.safetensors or its index)"
        )
    fields = {"init_from": str(directory), "out": str(out), "steps": 0, **flags}
    return TrainConfig(**inherit_from_source(fields))
