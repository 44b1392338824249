"""Training configuration: one frozen dataclass, saved as config.json with each run."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from muonjax.models.config import PRESETS

OPTIMIZERS = ("muon", "adamw")
TOKENIZERS = ("byte", "bpe")

# Fields a resumed run may change; anything else changes what is computed.
RESUMABLE = frozenset(
    {
        "steps",
        "checkpoint_every",
        "eval_every",
        "log_every",
        "keep_checkpoints",
        "progress",
        "cpu_devices",
        "mesh",  # a checkpoint restores onto any mesh
        "zero1",
    }
)


class ConfigError(ValueError):
    """A bad value a user can pass: the CLI prints it on one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. `decay_steps` (default: steps) is the cosine horizon, so
    a run can be stopped at N and resumed to 2N on the schedule of a 2N run."""

    out: str = "runs/default"
    preset: str = "tiny"
    optimizer: str = "muon"  # muon = the Moonlight recipe (muonjax.moonlight)
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 1e-2
    warmup_steps: int = 20
    decay_steps: int | None = None
    weight_decay: float = 0.1
    seed: int = 0
    data: tuple[str, ...] = ()  # files, folders or globs; empty: the Python stdlib
    tokenizer: str = "byte"
    bpe_vocab_size: int = 1024
    validation_fraction: float = 0.02
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops
    cpu_devices: int | None = None
    mesh: str | None = None  # "data=4,expert=2"; default: every device on data
    zero1: bool = True  # partition optimizer state over the data axis
    progress: bool = True

    def __post_init__(self):
        problems = []

        def check(ok, message):
            if not ok:
                problems.append(message)

        check(
            self.preset in PRESETS,
            f"--preset {self.preset!r} is unknown (valid: {', '.join(PRESETS)})",
        )
        check(
            self.optimizer in OPTIMIZERS,
            f"--optimizer {self.optimizer!r} is unknown (valid: {', '.join(OPTIMIZERS)})",
        )
        check(
            self.tokenizer in TOKENIZERS,
            f"--tokenizer {self.tokenizer!r} is unknown (valid: {', '.join(TOKENIZERS)})",
        )
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "eval_every",
            "log_every",
            "checkpoint_every",
        ):
            check(
                getattr(self, name) > 0,
                f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}",
            )
        for name in ("warmup_steps", "seed", "eval_batches"):
            check(
                getattr(self, name) >= 0,
                f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}",
            )
        check(self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}")
        check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        check(
            self.keep_checkpoints >= 1,
            f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}",
        )
        check(
            self.max_nonfinite >= 1, f"--max-nonfinite must be at least 1, got {self.max_nonfinite}"
        )
        check(
            0 < self.validation_fraction < 1,
            f"--validation-fraction must be in (0, 1), got {self.validation_fraction}",
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
            self.cpu_devices is None or self.cpu_devices >= 1,
            f"--cpu-devices must be at least 1, got {self.cpu_devices}",
        )
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def schedule_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.steps

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"config.json has unknown fields {sorted(unknown)}")
        data = dict(data)
        data["data"] = tuple(data.get("data", ()))
        return cls(**data)

    def resume_changes(self, saved: TrainConfig) -> list[str]:
        """The fields that differ from a saved run's and may not change on resume."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in RESUMABLE and getattr(self, f.name) != getattr(saved, f.name)
        ]


def save_json(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
