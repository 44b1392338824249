"""Training configuration: one frozen dataclass, saved as config.json with each run.

Every field carries its command-line help in its metadata, so `muonjax train
--help`, `TrainConfig.from_args` and the Python defaults come from this one
place.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import types
import typing

from muonjax.files import NotRegularFile, regular_file_size
from muonjax.models.config import COMPUTE_DTYPES, DISPATCH_METHODS, PRESETS, ModelConfig
from muonjax.models.generate import MAX_SEED
from muonjax.optim import UPDATE_SCALE_RULES
from muonjax.train.optimizers import NS_COEFFS, NS_DTYPES, OPTIMIZERS, SCHEDULES

# in each run's directory
CONFIG_FILE = "config.json"  # {"train": TrainConfig, "model": ModelConfig, "data": ..., ...}
CHECKPOINT_DIR = "checkpoints"  # orbax, one folder per step
MAX_CONFIG_BYTES = 2**26  # a run's config.json is a few KiB; read whole, so bounded
TOKENIZERS = ("byte", "bpe", "checkpoint")
DATA_FORMATS = ("text", "sft-jsonl")
# simulated CPU devices: each is a thread pool of XLA's; far more than any real
# mesh to simulate, and far fewer than the count at which start-up never ends
MAX_CPU_DEVICES = 4096

# Fields a resumed run may change; anything else changes what is computed.
RESUMABLE = frozenset(
    {
        "steps",
        "checkpoint_every",
        "eval_every",
        "log_every",
        "svd_entropy_every",  # a metric's cadence, not part of the training
        "large_logit_threshold",  # a metric's threshold, not part of the training
        "keep_checkpoints",
        "progress",
        "cpu_devices",
        "mesh",  # a checkpoint restores onto any mesh
        "zero1",
        "grad_accum",  # the same global batch, summed in float32: a memory knob
        "remat",  # recomputes, changes no value
        "moe_dispatch",  # how experts are computed: the same values, to rounding (as mesh)
        "memory_check",  # a check before set-up: changes nothing computed
    }
)
# Where the run and its inputs are: a resumed run compares what they hold (the
# run directory is the run; the data's fingerprint; the source's checkpoint),
# not how the paths are spelled, so a run can be resumed from another working
# directory or after its folder was moved.
LOCATIONS = frozenset({"out", "data", "init_from"})
# Fields a resumed run may change to recover from a divergence or to extend its
# schedule: each change is logged and recorded in config.json's "history".
# QK-Clip too: turning it on is how a run whose attention logits blew up goes on.
RECOVERY = frozenset({"learning_rate", "decay_steps", "qk_clip"})

# Model fields --model may not set: --dtype / --remat / --moe-dispatch are flags
# of their own. The vocabulary is the tokenizer's unless --model sets a larger one
# (a checkpoint's padded vocabulary).
_NOT_MODEL_OVERRIDES = frozenset({"dtype", "remat", "moe_dispatch"})


# sysexits' EX_TEMPFAIL: a run stopped by a signal, with nothing lost; relaunch it (the CLI's code)
EXIT_PREEMPTED = 75


class ConfigError(ValueError):
    """A bad value a user can pass: the CLI prints it on one line and exits 2."""


class WriteFailed(RuntimeError):
    """The run's files could not be written (disk full, an I/O error): the run
    stopped; its complete checkpoints are intact. The CLI prints it on one line."""


def _field(default, help: str, *, choices=None, factory=None):
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. `decay_steps` (default: steps) is the schedule's horizon,
    so a run can be stopped at N and resumed to 2N on the schedule of a 2N run."""

    # the run
    out: str = _field("runs/default", "run directory; must not exist unless --resume")
    seed: int = _field(0, f"seed for initialization and data order, 0 to {MAX_SEED}")
    steps: int = _field(200, "number of optimizer steps in the run")
    batch_size: int = _field(
        16, "global batch in sequences per optimizer step; divisible by the data-parallel size"
    )
    seq_len: int = _field(128, "tokens per sequence")
    grad_accum: int = _field(
        1,
        "split each global batch into this many micro-batches inside the step and sum their "
        "gradients (float32) before one optimizer update; peak memory follows batch/grad_accum",
    )
    # the model
    preset: str = _field("tiny", "model preset", choices=tuple(PRESETS))
    model: dict = _field(
        None,
        "override ModelConfig fields of the preset, KEY=VALUE,... "
        "(e.g. d_model=384,n_layers=6,n_routed_experts=32)",
        factory=dict,
    )
    dtype: str | None = _field(
        None,
        "activations and matmuls (parameters and optimizer state stay float32); default: the preset's",
        choices=COMPUTE_DTYPES,
    )
    remat: bool | None = _field(
        None,
        "recompute each layer in the backward pass instead of storing it; default: the preset's",
    )
    moe_dispatch: str | None = _field(
        None,
        "how routed experts are computed: blocks (sorted row blocks, plain matmuls), ragged_dot "
        "(jax.lax.ragged_dot, grouped matmuls on GPU/TPU; a dense masked matmul on CPU), auto "
        "(blocks on CPU, ragged_dot on accelerators); default: the preset's (auto)",
        choices=DISPATCH_METHODS,
    )
    # the optimizer
    optimizer: str = _field(
        "muon",
        "muon: the Moonlight recipe (Muon for hidden matrices, AdamW for embeddings, head, "
        "norms); adamw: AdamW everywhere",
        choices=tuple(OPTIMIZERS),
    )
    learning_rate: float = _field(1e-2, "peak learning rate, shared by Muon and AdamW")
    weight_decay: float = _field(0.1, "decoupled weight decay, shared by Muon and AdamW")
    weight_decay_adamw: float | None = _field(
        None, "weight decay of the muon recipe's AdamW group alone; default: --weight-decay"
    )
    decay_norms: bool = _field(
        True, "decay norm scales and biases too (--no-decay-norms: only matrices decay)"
    )
    rms_scale: float = _field(0.2, "Muon's target update RMS (paper Sec. 2.2: AdamW's 0.2)")
    update_scale: str = _field(
        "moonlight",
        "how Muon scales each orthogonalized matrix (paper Table 1): moonlight = rms_scale "
        "sqrt(max(A,B)) (Adjusted LR), hidden = rms_scale sqrt(d_model) (Baseline), "
        "update_norm = rms_scale / RMS(O) (Update Norm), jordan = sqrt(max(1, fan_out/fan_in))",
        choices=UPDATE_SCALE_RULES,
    )
    momentum: float = _field(0.95, "Muon's momentum")
    nesterov: bool = _field(True, "Nesterov momentum for Muon")
    ns_steps: int = _field(5, "Newton-Schulz iterations")
    ns_coeffs: str = _field("jordan", "Newton-Schulz coefficients", choices=NS_COEFFS)
    ns_dtype: str = _field("float32", "Newton-Schulz compute dtype", choices=NS_DTYPES)
    adam_b1: float = _field(0.9, "AdamW's beta1")
    adam_b2: float = _field(0.95, "AdamW's beta2")
    adam_eps: float = _field(1e-8, "AdamW's epsilon")
    # the schedule
    schedule: str = _field(
        "cosine",
        "cosine: warmup then cosine decay; wsd: warmup, stable, then linear decay over the last "
        "--decay-fraction; constant: warmup then constant",
        choices=tuple(SCHEDULES),
    )
    warmup_steps: int = _field(20, "linear warmup steps from 0 to the peak learning rate")
    decay_steps: int | None = _field(
        None,
        "the schedule's horizon in steps (default: --steps); fix it to extend a run later",
    )
    decay_fraction: float = _field(0.2, "wsd: fraction of the horizon spent decaying")
    min_lr_ratio: float = _field(0.1, "final learning rate as a fraction of the peak")
    # the data
    data: tuple[str, ...] = _field(
        (),
        "text files, folders or globs (several allowed); default: the Python standard library's source",
    )
    data_format: str = _field(
        "text",
        'text: plain text; sft-jsonl: one {"prompt": ..., "response": ...} per line, '
        "loss on response tokens only",
        choices=DATA_FORMATS,
    )
    tokenizer: str = _field(
        "byte",
        "byte: raw UTF-8 bytes; bpe: a byte-level BPE trained on the run's data and saved with "
        "it; checkpoint: the tokenizer files of the --init-from Hugging Face checkpoint "
        "(tokenizer.json or tiktoken.model), copied into the run",
        choices=TOKENIZERS,
    )
    bpe_vocab_size: int = _field(1024, "vocabulary size of the BPE tokenizer")
    validation_fraction: float = _field(
        0.02, "fraction of the text held out for evaluation (the end of the corpus)"
    )
    # fine-tuning
    init_from: str | None = _field(
        None,
        "start from the final parameters of the run in this directory, or from a Hugging Face "
        "DeepseekV3 checkpoint (e.g. Moonlight-16B-A3B), for fine-tuning; its model and "
        "tokenizer are used",
    )
    init_optimizer_state: bool = _field(
        False, "with --init-from: keep that run's optimizer state too (same optimizer only)"
    )
    # logging, evaluation, checkpoints
    eval_every: int = _field(50, "steps between evaluations on the held-out text")
    eval_batches: int = _field(4, "batches per evaluation (at least 1)")
    log_every: int = _field(10, "steps between metrics lines")
    svd_entropy_every: int = _field(
        0,
        "log the mean SVD entropy of the hidden matrices per group of the paper's Fig. 4 "
        "(svd_entropy_AttnQO, _AttnKV, _Experts, _SharedExperts, _Router, _Dense) at step 0, "
        "every this many steps and at the last step; 0: never",
    )
    large_logit_threshold: float = _field(
        100.0,
        "attention logits (after the softmax scale) above this count toward the logged "
        "large_attention_logit_ratio (paper App. D: 100; small models need a lower one)",
    )
    qk_clip: float | None = _field(
        None,
        "QK-Clip threshold tau (MuonClip, Kimi K2: 100): after each step, every attention head "
        "whose max logit in the step (after the softmax scale, over the global batch) exceeded "
        "tau has its query and key weights rescaled by tau / max; default: off (the paper's recipe)",
    )
    checkpoint_every: int = _field(100, "steps between checkpoints")
    keep_checkpoints: int = _field(3, "how many recent checkpoints to keep")
    max_nonfinite: int = _field(5, "consecutive non-finite steps (skipped) before the run stops")
    progress: bool = _field(True, "a progress bar on a terminal")
    # devices
    cpu_devices: int | None = _field(
        None,
        f"simulate this many devices on the CPU (1 to {MAX_CPU_DEVICES}); default: the real devices",
    )
    mesh: str | None = _field(
        None,
        "device mesh as AXIS=SIZE,... over data, expert, tensor (unnamed axes are 1); "
        "default: every device on data",
    )
    zero1: bool = _field(
        True, "partition the optimizer state over the data axis (ZeRO-1; --no-zero1 replicates it)"
    )
    memory_check: bool = _field(
        True,
        "before building the model, refuse it when its parameters, gradients and optimizer "
        "moments (float32) cannot fit in the devices' memory together (accelerator memory, or "
        "the host's available memory for CPU devices); --no-memory-check tries anyway",
    )

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "model", dict(self.model or {}))
        problems = []
        reported = set()  # float fields whose own rule below already refused them

        def check(ok, message, name=None):
            if not ok:
                problems.append(message)
                reported.add(name)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                problems.append(f"{_flag(f)} {value!r} is unknown (valid: {', '.join(choices)})")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "log_every"):
            # --steps 0 sets the run up and saves its step-0 checkpoint (muonjax convert)
            check(
                getattr(self, name) > 0 or (name == "steps" and self.steps == 0),
                f"{_flag(name)} must be {'>= 0' if name == 'steps' else 'positive'}, "
                f"got {getattr(self, name)}",
            )
        for name in (
            "checkpoint_every",
            "grad_accum",
            "ns_steps",
            "keep_checkpoints",
            "max_nonfinite",
            "eval_batches",  # 0 would average no batches: a NaN eval_loss
        ):
            check(
                getattr(self, name) >= 1,
                f"{_flag(name)} must be at least 1, got {getattr(self, name)}",
            )
        for name in ("warmup_steps", "svd_entropy_every"):
            check(
                getattr(self, name) >= 0, f"{_flag(name)} must be >= 0, got {getattr(self, name)}"
            )
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
        for name in ("learning_rate", "rms_scale", "adam_eps"):
            value = getattr(self, name)
            check(
                finite(value) and value > 0,
                f"{_flag(name)} must be positive and finite, got {value}",
                name,
            )
        for name in ("weight_decay", "weight_decay_adamw"):
            value = getattr(self, name)
            check(
                value is None or (finite(value) and value >= 0),
                f"{_flag(name)} must be >= 0 and finite, got {value}",
                name,
            )
        check(
            finite(self.large_logit_threshold),
            f"{_flag('large_logit_threshold')} must be finite, got {self.large_logit_threshold}",
            "large_logit_threshold",
        )
        check(
            self.qk_clip is None or (finite(self.qk_clip) and self.qk_clip > 0),
            f"{_flag('qk_clip')} must be positive and finite, got {self.qk_clip}",
            "qk_clip",
        )
        for name in ("momentum", "adam_b1", "adam_b2", "min_lr_ratio", "decay_fraction"):
            value = getattr(self, name)
            check(
                finite(value) and 0 <= value <= 1,
                f"{_flag(name)} must be in [0, 1], got {value}",
                name,
            )
        check(  # --grad-accum below 1 is refused above, on its own
            self.grad_accum < 1 or self.batch_size % self.grad_accum == 0,
            f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}",
        )
        check(
            0 < self.validation_fraction < 1,
            f"--validation-fraction must be in (0, 1), got {self.validation_fraction}",
            "validation_fraction",
        )
        check(
            self.bpe_vocab_size >= 260,
            f"--bpe-vocab-size must be at least 260, got {self.bpe_vocab_size}",
        )
        check(
            self.decay_steps is None or self.decay_steps >= self.warmup_steps,
            f"--decay-steps ({self.decay_steps}) must be >= --warmup-steps ({self.warmup_steps})",
        )
        check(
            0 <= self.seed <= MAX_SEED,
            f"--seed must be in [0, {MAX_SEED}], got {self.seed}",
        )
        check(
            self.cpu_devices is None or 1 <= self.cpu_devices <= MAX_CPU_DEVICES,
            f"--cpu-devices must be in [1, {MAX_CPU_DEVICES}], got {self.cpu_devices}",
        )
        for name in ("out", "init_from"):
            value = getattr(self, name) or ""
            check(
                "://" not in value,
                f"--{name.replace('_', '-')} {value}: remote paths are not supported; "
                "use a local or mounted path",
                name,
            )
        check(
            not self.init_optimizer_state or self.init_from,
            "--init-optimizer-state needs --init-from",
        )
        for f in dataclasses.fields(self):  # every float flag, whether or not it has a rule above
            value = getattr(self, f.name)
            check(
                f.name in reported
                or _unwrap_optional(_hints()[f.name]) is not float
                or not isinstance(value, (int, float))
                or math.isfinite(value),
                f"{_flag(f)} must be a finite number, got {value}",
                f.name,
            )
        if problems:
            raise ConfigError("; ".join(problems))
        if self.preset in PRESETS:
            object.__setattr__(self, "model", _typed_overrides(self.model))
            self.model_config()  # raises ConfigError on an invalid combination

    @property
    def schedule_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.steps

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The preset with --model, --dtype and --remat applied (and the tokenizer's vocabulary)."""
        changes = dict(self.model)
        if self.dtype is not None:
            changes["dtype"] = self.dtype
        if self.remat is not None:
            changes["remat"] = self.remat
        if self.moe_dispatch is not None:
            changes["moe_dispatch"] = self.moe_dispatch
        if vocab_size is not None:
            if changes.get("vocab_size", vocab_size) < vocab_size:
                raise ConfigError(
                    f"--model vocab_size={changes['vocab_size']} is smaller than the "
                    f"tokenizer's vocabulary ({vocab_size})"
                )
            changes.setdefault("vocab_size", vocab_size)
        try:
            return PRESETS[self.preset].replace(**changes)
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        """A saved config; fields added since it was saved take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"config.json has unknown fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_args(cls, argv: list[str], base: TrainConfig | None = None) -> TrainConfig:
        """The config the same words give on the command line (`muonjax train ARGS`),
        on top of `base` (default: the defaults)."""
        parser = argparse.ArgumentParser(prog="TrainConfig.from_args", exit_on_error=False)
        add_arguments(parser)
        try:
            args, rest = parser.parse_known_args(argv)
        except argparse.ArgumentError as e:
            raise ConfigError(str(e)) from None
        if rest:
            raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
        # they read configs and manifests: they import this module
        from muonjax.train.finetune import inherit_from_source
        from muonjax.train.shards import inherit_from_shards

        given = inherit_from_shards(inherit_from_source(given_fields(args)))
        return (base or cls()).replace(**given)

    def resume_changes(self, saved: TrainConfig) -> list[str]:
        """The fields that differ from a saved run's and may not change on resume."""
        free = RESUMABLE | LOCATIONS | RECOVERY
        return [n for n in self._changed(saved) if n not in free]

    def recovery_changes(self, saved: TrainConfig) -> dict[str, list]:
        """{field: [saved value, this value]} for the RECOVERY fields that differ."""
        return {
            n: [getattr(saved, n), getattr(self, n)] for n in self._changed(saved) if n in RECOVERY
        }

    def _changed(self, saved: TrainConfig) -> list[str]:
        return [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(saved, f.name)
        ]


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def _flag(field) -> str:
    name = field if isinstance(field, str) else field.name
    return "--" + name.replace("_", "-")


def _unwrap_optional(hint):
    """X for `X | None`; anything else unchanged."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(t for t in args if t is not type(None))
    return hint


def _typed_overrides(model: dict) -> dict:
    valid = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_MODEL_OVERRIDES]
    unknown = sorted(set(model) - set(valid))
    if unknown:
        raise ConfigError(
            f"--model: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(valid: {', '.join(valid)})"
        )
    return {k: _typed(k, v) for k, v in model.items()}


def _typed(key: str, value):
    """A --model value as its ModelConfig field's type; strings are parsed."""
    hint = typing.get_type_hints(ModelConfig)[key]
    base = _unwrap_optional(hint)
    optional = base is not hint
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if isinstance(value, str) and base is not str:
        text = value
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--model {key}={text}: expected true or false")
            return text.lower() in ("true", "1")
        try:
            return base(text)
        except ValueError:
            raise ConfigError(f"--model {key}={text}: expected {base.__name__}") from None
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"--model {key}={value!r}: expected {base.__name__}")
    return value


def parse_model_overrides(text: str) -> dict:
    """'d_model=384,n_layers=6' -> {'d_model': '384', 'n_layers': '6'} (typed later)."""
    overrides = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model expects KEY=VALUE,..., got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def load_model_file(path: str) -> dict:
    """--model-config FILE.json: an object of ModelConfig fields."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--model-config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--model-config {path} is not JSON ({e.msg} at line {e.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--model-config {path} must hold a JSON object of ModelConfig fields")
    # a saved config.json's "model" works too: the tokenizer sets the vocabulary, and
    # --dtype, --remat and --moe-dispatch are flags of their own (default: the preset's)
    return {k: v for k, v in data.items() if k not in _NOT_MODEL_OVERRIDES | {"vocab_size"}}


def add_arguments(
    parser: argparse.ArgumentParser, defaults: dict | None = None, fields: tuple[str, ...] = ()
) -> None:
    """One flag per TrainConfig field (or per one of `fields`), help and defaults
    from the field (or from `defaults`, for a command whose defaults differ).
    Every default is SUPPRESS, so that the parsed namespace holds only the flags given."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if fields and f.name not in fields:
            continue
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        help_text = meta["help"]
        if default not in (None, (), {}):  # the others say their default in words
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        kind = _unwrap_optional(hints[f.name])
        kw = dict(help=help_text, default=argparse.SUPPRESS, dest=f.name)
        if meta.get("choices"):  # checked by TrainConfig, in its own words
            kw["metavar"] = "|".join(meta["choices"])
        flag = _flag(f)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "model":
            parser.add_argument(flag, type=str, metavar="KEY=VALUE,...", **kw)
            parser.add_argument(
                "--model-config",
                dest="model_config",
                default=argparse.SUPPRESS,
                metavar="FILE.json",
                help="ModelConfig fields from a JSON object (a run's config.json 'model' works); "
                "--model overrides it",
            )
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="+", **kw)
        else:
            parser.add_argument(flag, type=kind, **kw)


def given_fields(args: argparse.Namespace) -> dict:
    """The TrainConfig fields a parsed namespace sets (--model and --model-config merged)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "model" in given or hasattr(args, "model_config"):
        model = load_model_file(args.model_config) if hasattr(args, "model_config") else {}
        model.update(parse_model_overrides(given.get("model", "")))
        given["model"] = model
    return given


def read_run_config(out: pathlib.Path, flag: str = "--resume") -> dict:
    """The config.json of the run in `out` (its "train", "model", "data", ...
    objects), or a ConfigError that names `flag` and the file."""
    path = pathlib.Path(out) / CONFIG_FILE
    if not os.path.lexists(path):
        raise ConfigError(
            f"{flag} {out}: no {CONFIG_FILE} there; it is not a muonjax train run's --out"
        )
    try:
        size = regular_file_size(path)  # a FIFO would block the read forever
    except NotRegularFile as e:
        raise ConfigError(f"{flag}: {e}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{flag}: {path} has {size:,} bytes, more than a run's config.json")
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{flag}: cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"{flag}: {path} is not valid JSON{where}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), dict) for k in ("train", "model")
    ):
        raise ConfigError(f"{flag}: {path} is not a muonjax run's config (no train and model)")
    return data


def save_json(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
