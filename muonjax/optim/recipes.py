"""The Moonlight recipe: Muon for hidden matrices, AdamW for everything else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from muonjax.optim.matrix_axes import MatrixAxesFn
from muonjax.optim.muon import OrthogonalizeWith, muon
from muonjax.optim.newton_schulz import CoefficientsLike

MUON, ADAMW = "muon", "adamw"


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def moonlight_labels(params: Any) -> Any:
    """Labels each leaf "muon" or "adamw", as `moonlight` routes it by default.

    AdamW takes the token embedding, the LM head, norms and biases: every leaf
    with ndim < 2, and every leaf on whose path some key contains "embed" or
    equals "lm_head", "scale" or "bias" (Flax's names, so ('embed',
    'embedding'), ('lm_head', 'kernel') and a scanned norm's (layers, D)
    'scale' go there). Muon takes the remaining matrices and stacks of them.
    """

    def label(path, leaf):
        names = [_key_name(k).lower() for k in path]
        if jnp.ndim(leaf) < 2 or any(
            "embed" in n or n in ("lm_head", "scale", "bias") for n in names
        ):
            return ADAMW
        return MUON

    return jax.tree_util.tree_map_with_path(label, params)


def moonlight(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: CoefficientsLike = "jordan",
    rms_scale: float = 0.2,
    eps: float = 1e-7,
    mu_dtype: Any | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    labels: Callable[[Any], Any] | None = None,
    matrix_axes: MatrixAxesFn | None = None,
    orthogonalize_with: OrthogonalizeWith | None = None,
) -> optax.GradientTransformation:
    """Moonlight's optimizer (paper Sec. 2.2): `muon` plus AdamW, one lr and wd.

    Leaves labelled "muon" get W <- W - lr (rms_scale sqrt(max(A,B)) O + wd W);
    leaves labelled "adamw" get AdamW(adam_b1, adam_b2, adam_eps) with the same
    learning rate and weight decay. `labels` maps the params to a tree of
    "muon" / "adamw"; by default `moonlight_labels`.
    """
    return optax.partition(
        {
            MUON: muon(
                learning_rate,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                ns_coeffs=ns_coeffs,
                rms_scale=rms_scale,
                eps=eps,
                mu_dtype=mu_dtype,
                matrix_axes=matrix_axes,
                orthogonalize_with=orthogonalize_with,
            ),
            ADAMW: optax.adamw(
                learning_rate,
                b1=adam_b1,
                b2=adam_b2,
                eps=adam_eps,
                weight_decay=weight_decay,
                mu_dtype=mu_dtype,
            ),
        },
        moonlight_labels if labels is None else labels,
    )
