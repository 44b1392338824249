"""Run directories <-> Hugging Face DeepseekV3 checkpoints (`muonjax convert`), and
a trained model with its tokenizer from either (`muonjax generate`).

Both read their source as untrusted input and write nothing to it: a run is
read from its newest checkpoint that restores (checkpoint.read_arrays), even
while it trains. `convert` writes its --out whole or not at all (written_whole).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib

import jax
from flax import nnx

from muonjax import files
from muonjax.models import ModelConfig, abstract_model
from muonjax.models.generate import DEFAULT_MAX_LEN, check_generation_fits, length_errors
from muonjax.models.hf import CheckpointError, from_hf, hf_config, is_hf_checkpoint, to_hf
from muonjax.models.memory import TooLarge, check_fits
from muonjax.train.checkpoint import read_arrays
from muonjax.train.config import TrainConfig
from muonjax.train.errors import ConfigError
from muonjax.train.finetune import inherit_from_source
from muonjax.train.preemption import ends_at_once
from muonjax.train.rundir import CONFIG_FILE, read_run_config, save_json
from muonjax.train.tokenizer import (
    BPE_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    CheckpointTokenizer,
    has_checkpoint_tokenizer,
    tokenizer_for_run,
)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A run directory or a Hugging Face checkpoint, as far as its config says:
    nothing of its weights is read yet."""

    path: pathlib.Path
    config: ModelConfig
    train: TrainConfig | None  # None for a Hugging Face checkpoint
    max_len: int  # the longest prompt + new tokens `generate` takes by default
    flag: str  # the flag that named it, for error messages


def model_source(path, flag: str = "--run") -> ModelSource:
    """The run directory or Hugging Face checkpoint at `path`; ConfigError if it is neither."""
    path = pathlib.Path(path)
    if is_hf_checkpoint(path):
        try:
            config = hf_config(path)
        except CheckpointError as e:
            raise ConfigError(f"{flag} {e}") from None
        return ModelSource(path, config, None, _max_position_embeddings(path), flag)
    saved = read_run_config(path, flag)
    try:
        train, config = TrainConfig.from_json(saved["train"]), ModelConfig(**saved["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{flag} {path / CONFIG_FILE}: not a run's config ({e})") from None
    return ModelSource(path, config, train, DEFAULT_MAX_LEN, flag)


def _max_position_embeddings(path: pathlib.Path) -> int:
    """A checkpoint's config.json max_position_embeddings (which hf_config has read
    and checked as a whole), where it is a positive integer; else DEFAULT_MAX_LEN."""
    value = json.loads((path / CONFIG_FILE).read_text()).get("max_position_embeddings")
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if ok else DEFAULT_MAX_LEN


def load_tokenizer(source: ModelSource):
    """The source's tokenizer (None for a checkpoint that ships none); ConfigError
    if its files do not load (damaged, or not a tokenizer)."""
    path, train, flag = source.path, source.train, source.flag
    if train is not None and train.tokenizer == "bpe" and not (path / BPE_FILE).is_file():
        # else tokenizer_for_run would train a new one
        raise ConfigError(f"{flag} {path}: its BPE tokenizer {path / BPE_FILE} is missing")
    try:
        if train is not None:
            return tokenizer_for_run(train.tokenizer, path, [], train.bpe_vocab_size)
        return CheckpointTokenizer(path) if has_checkpoint_tokenizer(path) else None
    except (ValueError, OSError) as e:  # tokenizer.py names the file that does not load
        raise ConfigError(f"{flag} {path}: its tokenizer does not load ({e})") from None


def encode_prompts(tokenizer, texts: list[str], source: ModelSource) -> list[list[int]]:
    """Each text's token ids, with BOS where the tokenizer adds one; ConfigError for
    text that is not UTF-8 (argv's undecodable bytes arrive as lone surrogates) or
    that encodes to nothing, and for a source without a tokenizer."""
    if tokenizer is None:
        where = f"{source.flag} {source.path}"
        raise ConfigError(f"{where}: it ships no tokenizer to read --prompt with")
    for i, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"--prompt {i} is not UTF-8 text (at character {e.start})") from None
    prompts = [[int(t) for t in ids] for ids in tokenizer.encode(texts)]
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        prompts = [[tokenizer.bos_id, *ids] for ids in prompts]
    if any(len(ids) == 0 for ids in prompts):
        raise ConfigError("--prompt: an empty prompt has nothing to continue")
    return prompts


def check_generation(source: ModelSource, prompts, max_new_tokens: int, max_len: int, spell):
    """ConfigError unless the longest prompt + max_new_tokens is at most max_len and
    the parameters, the KV cache and the prefill fit in one device's memory: checked
    from shapes alone, before anything is loaded or compiled."""
    longest = max(map(len, prompts))
    errors = length_errors([longest], max_new_tokens, max_len, spell)
    if errors:
        raise ConfigError("Cannot generate: " + "; ".join(errors))
    device = jax.devices()[:1]
    try:
        check_generation_fits(
            source.config, device, len(prompts), longest, max_new_tokens, with_params=True
        )
    except TooLarge as e:
        raise ConfigError(str(e)) from None


def load_model(source: ModelSource, *, step: int | None = None, log=print):
    """The source's model on one device: a Hugging Face checkpoint's, or a run's
    checkpoint `step` (default: its newest that restores; a newer one that does
    not is named in a warning line through `log`, and left as it is)."""
    if source.train is None:
        if step is not None:
            raise ConfigError(f"--step: {source.path} is a Hugging Face checkpoint, which has one")
        try:
            return from_hf(source.path)
        except CheckpointError as e:
            raise ConfigError(f"{source.flag} {e}") from None
    try:
        check_fits(source.config, jax.devices()[:1])
    except TooLarge as e:
        raise ConfigError(f"{source.flag} {source.path}: {e}") from None
    graphdef, params, rest = nnx.split(abstract_model(source.config), nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)
    wanted = {"params": jax.tree.map(on_device, params), "rest": jax.tree.map(on_device, rest)}
    _, restored = read_arrays(source.path, wanted, source.flag, step=step, log=log)
    return nnx.merge(graphdef, restored["params"], restored["rest"])


def run_to_hf(run, directory, *, dtype: str = "float32", step: int | None = None, log=print):
    """Writes a run's checkpoint (`step`, default its newest that restores) as a
    Hugging Face checkpoint in `directory` (new), with its tokenizer's files where
    it has some (a BPE's tokenizer.json, or the checkpoint tokenizer it was
    fine-tuned with)."""
    run = pathlib.Path(run)
    if is_hf_checkpoint(run):
        raise ConfigError(f"--to-hf {run} is a Hugging Face checkpoint already")
    source = model_source(run, "--to-hf")
    tokenizer = load_tokenizer(source)
    model = load_model(source, step=step, log=log)
    names = (
        (tokenizer.model_file, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)
        if isinstance(tokenizer, CheckpointTokenizer)
        else (BPE_FILE,)
    )
    extra = {name: run / name for name in names if (run / name).is_file()}
    try:
        to_hf(model, directory, dtype=dtype, extra_files=extra)
    except CheckpointError as e:
        raise ConfigError(f"--to-hf {run}: {e}") from None


def hf_to_run_config(directory, out, **flags) -> TrainConfig:
    """The TrainConfig of `muonjax convert --from-hf`: a run of 0 steps that starts
    from the checkpoint, so that training saves it as the run's step 0 (with a
    fresh optimizer state, the config, and the tokenizer)."""
    if not is_hf_checkpoint(directory):
        where = pathlib.Path(directory) / CONFIG_FILE
        raise ConfigError(
            f"--from-hf {directory}: not a Hugging Face checkpoint (needs {where} with a "
            "model_type, and model.safetensors or its index)"
        )
    fields = {"init_from": str(directory), "out": str(out), "steps": 0, **flags}
    return TrainConfig(**inherit_from_source(fields))


def record_out(run: pathlib.Path, out) -> None:
    """Makes config.json name `out` as the run's --out: a run written in a partial
    folder then renamed (resume compares a run by what it holds, not by its path;
    this is for whoever reads the file)."""
    saved = read_run_config(run, "--out")
    saved["train"]["out"] = str(out)
    save_json(run / CONFIG_FILE, saved)


@contextlib.contextmanager
def written_whole(out, command: str = "muonjax convert"):
    """files.written_whole for a command: yields where to write `out`, which appears
    whole or not at all; SIGTERM / SIGINT end the process at once (one line, exit
    128 + the signal), the partial folder removed. ConfigError if `out` appeared
    meanwhile."""
    with ends_at_once(command, out):
        try:
            with files.written_whole(out) as path:
                yield path
        except FileExistsError:
            raise ConfigError(
                f"--out {out} was created while convert ran; nothing was written"
            ) from None
