"""Hyperparameters checked where a transformation is built: one clear message
each, not a NumPy error at the first update. A value that is a JAX or NumPy
array (as `optax.inject_hyperparams` passes them, possibly traced) is left
unchecked."""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf,
                 high_open: bool = False) -> None:  # fmt: skip
    """TypeError unless `value` is a real number (or an array); ValueError unless
    it is finite and in [low, high] ([low, high) with `high_open`)."""
    if hasattr(value, "shape") and not isinstance(value, numbers.Number):
        return  # an array: its value may not be known yet
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or value < low or above:
        bound = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be finite and in {bound}, got {value!r}")


def check_rate(name: str, value: Any) -> None:
    """A learning rate: a number >= 0, or a schedule (a callable of the step)."""
    if not callable(value):
        try:
            check_number(name, value)
        except TypeError:
            raise TypeError(
                f"{name} must be a number or an optax schedule (a callable of the step), "
                f"got {value!r}"
            ) from None
