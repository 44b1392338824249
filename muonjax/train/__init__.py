"""Training: config, grain data, orbax checkpoints, the step loop, metrics, CLI.

from muonjax.train import TrainConfig, run
summary = run(TrainConfig.from_args(["--preset", "tiny", "--steps", "100", "--out", "runs/a"]))
"""

from muonjax.train.config import ConfigError, TrainConfig
from muonjax.train.loop import Preempted, Summary, TrainingStopped, run
from muonjax.train.metrics import read_metrics

__all__ = [
    "ConfigError",
    "Preempted",
    "Summary",
    "TrainConfig",
    "TrainingStopped",
    "read_metrics",
    "run",
]
