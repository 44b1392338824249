"""Training: config, grain data, orbax checkpoints, the step loop, metrics, CLI."""

from muonjax.train.config import ConfigError, TrainConfig
from muonjax.train.loop import TrainingStopped, train
from muonjax.train.metrics import read_metrics

__all__ = ["ConfigError", "TrainConfig", "TrainingStopped", "read_metrics", "train"]
