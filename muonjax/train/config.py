"""Training configuration: one frozen dataclass, saved as config.json with each run.

Every field carries its command-line help in its metadata, so `muonjax train
--help` (flags.py), `flags.config_from_args` and the Python defaults come from
this one place. The sets of fields by role (what a resume may change, what a
fine-tune inherits or may change) are here too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing

from muonjax.models.config import (
    ATTENTION_KERNELS,
    COMPUTE_DTYPES,
    DISPATCH_METHODS,
    PRESETS,
    REMAT_POLICIES,
    ModelConfig,
    remat_policy,
)
from muonjax.models.generate import MAX_SEED
from muonjax.optim import UPDATE_SCALE_RULES
from muonjax.train.errors import ConfigError
from muonjax.train.optimizers import NS_COEFFS, NS_DTYPES, OPTIMIZERS, SCHEDULES

TOKENIZERS = ("byte", "bpe", "checkpoint")
DATA_FORMATS = ("text", "sft-jsonl")
CORPORA = ("stdlib", "python")  # --corpus: the built-in corpora (corpus.load_corpus)
HOLDOUTS = ("documents", "tail")
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
        "final_eval_tokens",  # an evaluation's size, not part of the training
        "keep_checkpoints",
        "progress",
        "cpu_devices",
        "mesh",  # a checkpoint restores onto any mesh
        "zero1",
        "grad_accum",  # the same global batch, summed in float32: a memory knob
        "remat",  # recomputes, changes no value
        "moe_dispatch",  # how experts are computed: the same values, to rounding (as mesh)
        "attention_kernel",  # how attention is computed: the same, to rounding
        "memory_check",  # a check before set-up: changes nothing computed
    }
)
# Where the run and its inputs are: a resumed run compares what they hold (the
# run directory is the run; the data's fingerprint; the source's checkpoint),
# not how the paths are spelled, so a run can be resumed from another working
# directory or after its folder was moved.
LOCATIONS = frozenset({"out", "data", "corpus", "init_from"})
# Fields a resumed run may change to recover from a divergence or to extend its
# schedule: each change is logged and recorded in config.json's "history".
# QK-Clip too: turning it on is how a run whose attention logits blew up goes on.
RECOVERY = frozenset({"learning_rate", "decay_steps", "qk_clip"})
# Set by an --init-from run's config and taken as they are when not given.
INHERITED = ("preset", "model", "tokenizer", "bpe_vocab_size")
# Fields that, with --data, make a run's token streams: `muonjax tokenize` takes them,
# and a shards folder fixes them (a run that does not give them takes its manifest's).
TOKENIZATION_FIELDS = (
    "data_format",
    "tokenizer",
    "bpe_vocab_size",
    "validation_fraction",
    "holdout",
)
# Values of fields whose default changed, for configs (and shards manifests) saved
# before the field existed: an old run resumes as it was made.
SAVED_BEFORE = {"holdout": "tail"}

# ModelConfig fields with flags of their own (--dtype, --remat, --moe-dispatch,
# --attention-kernel), which --model may not set; and the model fields a fine-tune may
# change, since they compute the same function of the same parameters (precision,
# recomputation, the MoE and attention kernels).
# The vocabulary is the tokenizer's unless --model sets a larger one (a checkpoint's
# padded vocabulary).
FREE_MODEL_FIELDS = frozenset({"dtype", "remat", "moe_dispatch", "attention_kernel"})


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
    remat: str | None = _field(
        None,
        "what the backward pass recomputes instead of storing: none (nothing: most memory), "
        "dots (all but the matmul outputs), full (each layer from its input: least memory, "
        "most recomputation); --remat alone is full, --no-remat is none; default: the preset's",
        choices=REMAT_POLICIES,
    )
    moe_dispatch: str | None = _field(
        None,
        "how routed experts are computed: blocks (sorted row blocks, a loop over the used ones, "
        "plain matmuls), tiles (sorted rows padded to fixed tiles, one batched matmul over all "
        "tiles with each tile's expert weights gathered: no loop, FLOPs XLA can count), "
        "ragged_dot (jax.lax.ragged_dot, grouped matmuls on GPU/TPU; a dense masked matmul on "
        "CPU), megablox (Pallas TPU grouped matmul; interpreted, slowly, elsewhere), auto "
        "(blocks on CPU, ragged_dot on GPU, megablox on TPU); default: the preset's (auto)",
        choices=DISPATCH_METHODS,
    )
    attention_kernel: str | None = _field(
        None,
        "how attention is computed: cudnn (jax.nn.dot_product_attention's cuDNN fused flash "
        "attention: GPU, bfloat16), xla (its XLA path, any backend), splash (Pallas TPU splash "
        "attention; interpreted, slowly, elsewhere), auto (splash on TPU, cudnn on a GPU in "
        "bfloat16 where its head dim fits, else xla); default: the preset's (auto)",
        choices=ATTENTION_KERNELS,
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
    ns_dtype: str = _field(
        "auto",
        "Newton-Schulz compute dtype; auto: bfloat16 on a GPU or TPU, float32 on CPU",
        choices=NS_DTYPES,
    )
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
        "text files, folders or globs (several allowed); default: the built-in --corpus",
    )
    corpus: str = _field(
        "stdlib",
        "the built-in corpus when --data is not given: stdlib: the Python standard library's "
        "source (12M characters); python: that plus every installed package's Python source "
        "(112M characters in the project's environment; fingerprinted, and the packages' "
        "versions recorded with the run)",
        choices=CORPORA,
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
        0.02, "fraction of the text (or of the SFT examples) held out for evaluation"
    )
    holdout: str = _field(
        "documents",
        "documents: whole files (SFT examples) chosen by content hash are held out, and "
        "evaluations read windows spread over all of them (SFT: one example per row); "
        "tail: the end of the corpus in order, evaluated on its first windows (runs made "
        "before this flag resume so)",
        choices=HOLDOUTS,
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
    final_eval_tokens: int = _field(
        2**18,
        "after the last step, the held-out loss on at least this many tokens (windows "
        "spread over the held-out text; all of it when it holds fewer; SFT: every held-out "
        "example), logged as final_eval_loss; 0: none",
    )
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
        object.__setattr__(self, "remat", remat_policy(self.remat))  # older configs: a bool
        problems = _Problems()
        self._check_choices(problems)
        self._check_counts(problems)
        self._check_rates(problems)
        self._check_combinations(problems)
        self._check_finite(problems)  # last: every float that no rule above refused
        if problems.messages:
            raise ConfigError("; ".join(problems.messages))
        if self.preset in PRESETS:
            object.__setattr__(self, "model", _typed_overrides(self.model))
            self.model_config()  # raises ConfigError on an invalid combination

    def _check_choices(self, problems: _Problems) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                problems.add(f"{flag_name(f)} {value!r} is unknown (valid: {', '.join(choices)})")

    def _check_counts(self, problems: _Problems) -> None:
        """The integer fields' ranges."""
        for name in ("steps", "batch_size", "seq_len", "eval_every", "log_every"):
            # --steps 0 sets the run up and saves its step-0 checkpoint (muonjax convert)
            problems.check(
                getattr(self, name) > 0 or (name == "steps" and self.steps == 0),
                f"{flag_name(name)} must be {'>= 0' if name == 'steps' else 'positive'}, "
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
            problems.check(
                getattr(self, name) >= 1,
                f"{flag_name(name)} must be at least 1, got {getattr(self, name)}",
            )
        for name in ("warmup_steps", "svd_entropy_every", "final_eval_tokens"):
            problems.check(
                getattr(self, name) >= 0,
                f"{flag_name(name)} must be >= 0, got {getattr(self, name)}",
            )

    def _check_rates(self, problems: _Problems) -> None:
        """The float fields' ranges (each refusal recorded, so _check_finite skips it)."""
        for name in ("learning_rate", "rms_scale", "adam_eps"):
            value = getattr(self, name)
            problems.check(
                _finite(value) and value > 0,
                f"{flag_name(name)} must be positive and finite, got {value}",
                name,
            )
        for name in ("weight_decay", "weight_decay_adamw"):
            value = getattr(self, name)
            problems.check(
                value is None or (_finite(value) and value >= 0),
                f"{flag_name(name)} must be >= 0 and finite, got {value}",
                name,
            )
        problems.check(
            _finite(self.large_logit_threshold),
            f"{flag_name('large_logit_threshold')} must be finite, got {self.large_logit_threshold}",
            "large_logit_threshold",
        )
        problems.check(
            self.qk_clip is None or (_finite(self.qk_clip) and self.qk_clip > 0),
            f"{flag_name('qk_clip')} must be positive and finite, got {self.qk_clip}",
            "qk_clip",
        )
        for name in ("momentum", "adam_b1", "adam_b2", "min_lr_ratio", "decay_fraction"):
            value = getattr(self, name)
            problems.check(
                _finite(value) and 0 <= value <= 1,
                f"{flag_name(name)} must be in [0, 1], got {value}",
                name,
            )

    def _check_combinations(self, problems: _Problems) -> None:
        """Fields checked together, and the ranges of the rest."""
        check = problems.check
        check(  # --grad-accum below 1 is refused by _check_counts, on its own
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
        check(0 <= self.seed <= MAX_SEED, f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        check(
            self.cpu_devices is None or 1 <= self.cpu_devices <= MAX_CPU_DEVICES,
            f"--cpu-devices must be in [1, {MAX_CPU_DEVICES}], got {self.cpu_devices}",
        )
        for name in ("out", "init_from"):
            value = getattr(self, name) or ""
            check(
                "://" not in value,
                f"{flag_name(name)} {value}: remote paths are not supported; "
                "use a local or mounted path",
                name,
            )
        check(
            not self.init_optimizer_state or self.init_from,
            "--init-optimizer-state needs --init-from",
        )
        check(
            not self.data or self.corpus == "stdlib",
            f"--corpus {self.corpus} goes without --data: --corpus picks the built-in corpus, "
            "--data replaces it; give one of them",
        )

    def _check_finite(self, problems: _Problems) -> None:
        """Every float field is finite, whether or not it has a rule of its own."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problems.check(
                f.name in problems.reported
                or field_type(f.name) is not float
                or not isinstance(value, (int, float))
                or math.isfinite(value),
                f"{flag_name(f)} must be a finite number, got {value}",
                f.name,
            )

    def due(self, done, every: int):
        """Whether the step that brings the run to `done` steps is one of every
        `every`, or the last (an int, or a traced one inside the train step)."""
        return (done % every == 0) | (done == self.steps)

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
        if self.attention_kernel is not None:
            changes["attention_kernel"] = self.attention_kernel
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
        """A saved config; fields added since it was saved take their defaults, or
        the value that was implied before they existed (SAVED_BEFORE)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"config.json has unknown fields {sorted(unknown)}")
        return cls(**{**SAVED_BEFORE, **data})

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


class _Problems:
    """The problems TrainConfig's checks found, in order, and the fields refused by
    a rule of their own (`reported`)."""

    def __init__(self):
        self.messages: list[str] = []
        self.reported: set[str | None] = set()

    def add(self, message: str) -> None:
        self.messages.append(message)

    def check(self, ok, message: str, name: str | None = None) -> None:
        if not ok:
            self.messages.append(message)
            self.reported.add(name)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def flag_name(field) -> str:
    """A TrainConfig field's flag (a name or a dataclasses.Field): --batch-size."""
    name = field if isinstance(field, str) else field.name
    return "--" + name.replace("_", "-")


def field_type(name: str) -> type:
    """The type of TrainConfig's field `name`, X for `X | None`."""
    return _unwrap_optional(_hints()[name])


def _unwrap_optional(hint):
    """X for `X | None`; anything else unchanged."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(t for t in args if t is not type(None))
    return hint


def _typed_overrides(model: dict) -> dict:
    valid = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in FREE_MODEL_FIELDS]
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
