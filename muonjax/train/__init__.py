"""Training: config, grain data, orbax checkpoints, the step loop, metrics, CLI.

from muonjax.train import config_from_args, run
summary = run(config_from_args(["--preset", "tiny", "--steps", "100", "--out", "runs/a"]))
"""

from muonjax.train.config import TrainConfig
from muonjax.train.errors import ConfigError
from muonjax.train.flags import config_from_args
from muonjax.train.loop import Preempted, Summary, TrainingStopped, run
from muonjax.train.metrics import read_metrics

__all__ = [
    "ConfigError",
    "Preempted",
    "Summary",
    "TrainConfig",
    "TrainingStopped",
    "config_from_args",
    "read_metrics",
    "run",
]
