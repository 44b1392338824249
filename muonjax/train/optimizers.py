"""Optimizers and learning-rate schedules by name. Adding one touches its table
only: TrainConfig's choices, `muonjax train --help`, the trainer and `inspect`
all read these."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

import muonjax

NS_COEFFS = muonjax.optim.newton_schulz.NAMED_COEFFICIENTS
NS_DTYPES = ("auto", "float32", "bfloat16")


def ns_dtype(config, platform: str | None = None) -> str:
    """config.ns_dtype, "auto" resolved for `platform` (default: JAX's default
    backend): bfloat16 on a GPU or TPU, where it ran 3 seeds side by side with
    float32 at no loss difference beyond seed noise (experiments/ns_dtype.py)
    and its matmuls are the faster; float32 on CPU."""
    if config.ns_dtype != "auto":
        return config.ns_dtype
    return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


def _moonlight(config, schedule, *, hidden_size: int, mesh=None):
    """Muon for hidden matrices, AdamW for the rest, one lr and wd (paper Sec. 2.2)."""
    return muonjax.moonlight(
        schedule,
        weight_decay=config.weight_decay,
        adamw_weight_decay=config.weight_decay_adamw,
        decay_norms_and_biases=config.decay_norms,
        momentum=config.momentum,
        nesterov=config.nesterov,
        ns_steps=config.ns_steps,
        ns_coeffs=config.ns_coeffs,
        compute_dtype=ns_dtype(config),
        rms_scale=config.rms_scale,
        update_scale=config.update_scale,
        hidden_size=hidden_size,
        adam_b1=config.adam_b1,
        adam_b2=config.adam_b2,
        adam_eps=config.adam_eps,
        mesh=mesh,
    )


def _adamw(config, schedule, *, hidden_size: int, mesh=None):
    """AdamW for every parameter."""
    del hidden_size, mesh
    return optax.adamw(
        schedule,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=None if config.decay_norms else muonjax.optim.weight_decay_mask,
    )


# name -> (config, schedule, *, hidden_size, mesh) -> optax.GradientTransformation
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "muon": _moonlight,
    "adamw": _adamw,
}


def _warmup(config, then: optax.Schedule, then_steps: int | None = None) -> optax.Schedule:
    """Linear warmup from 0 to the peak over warmup_steps, then `then`."""
    if config.warmup_steps == 0:
        return then
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, then], [config.warmup_steps])


def _cosine(config) -> optax.Schedule:
    """Warmup, then cosine decay to min_lr_ratio x peak at the horizon."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.schedule_steps, config.warmup_steps + 1),
        end_value=config.min_lr_ratio * config.learning_rate,
    )


def _wsd(config) -> optax.Schedule:
    """Warmup, stable at the peak, then linear decay to min_lr_ratio x peak over
    the last decay_fraction of the horizon (warmup-stable-decay)."""
    peak, horizon = config.learning_rate, config.schedule_steps
    decay = round(config.decay_fraction * horizon)
    stable = max(horizon - decay - config.warmup_steps, 0)
    tail = optax.linear_schedule(
        peak, config.min_lr_ratio * peak, max(horizon - stable - config.warmup_steps, 1)
    )
    after = (
        optax.join_schedules([optax.constant_schedule(peak), tail], [stable]) if stable else tail
    )
    return _warmup(config, after)


def _constant(config) -> optax.Schedule:
    """Warmup, then the peak learning rate for good."""
    return _warmup(config, optax.constant_schedule(config.learning_rate))


SCHEDULES: dict[str, Callable[[Any], optax.Schedule]] = {
    "cosine": _cosine,
    "wsd": _wsd,
    "constant": _constant,
}


def learning_rate_schedule(config) -> optax.Schedule:
    return SCHEDULES[config.schedule](config)


def make_optimizer(config, hidden_size: int, mesh=None) -> optax.GradientTransformation:
    """The run's optimizer on its schedule. `mesh`: the mesh Muon spreads
    Newton-Schulz over (Distributed Muon, see muonjax.optim.distributed; the
    trainer's is `Plan.newton_schulz_mesh`); `hidden_size`: the model width,
    for --update-scale hidden."""
    return OPTIMIZERS[config.optimizer](
        config, learning_rate_schedule(config), hidden_size=hidden_size, mesh=mesh
    )


def applied_count(opt_state) -> Any:
    """The optimizer's own step count: the schedule's argument for the next update.
    It lags the trainer's step by the skipped (non-finite) steps, whose state is rolled back."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1]
