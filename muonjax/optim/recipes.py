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


def _last_name(path: Any) -> str:
    names = [_key_name(k).lower() for k in path]
    while names and names[-1] == "value":  # nnx.State paths end in .value
        names.pop()
    return names[-1] if names else ""


def weight_decay_mask(params: Any) -> Any:
    """True for each leaf that gets weight decay when norms and biases do not.

    False for leaves with ndim < 2 and for leaves whose last path key is
    "scale" or "bias" (so a scanned (layers, D) norm scale too); the `mask`
    of `moonlight(decay_norms_and_biases=False)`'s AdamW group.
    """

    def decays(path, leaf):
        return not (jnp.ndim(leaf) < 2 or _last_name(path) in ("scale", "bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def moonlight(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: CoefficientsLike = "jordan",
    rms_scale: float = 0.2,
    update_scale: str = "moonlight",
    hidden_size: int | None = None,
    eps: float = 1e-7,
    mu_dtype: Any | None = None,
    compute_dtype: Any = "float32",
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adamw_weight_decay: float | None = None,
    decay_norms_and_biases: bool = True,
    labels: Callable[[Any], Any] | None = None,
    matrix_axes: MatrixAxesFn | None = None,
    orthogonalize_with: OrthogonalizeWith | None = None,
) -> optax.GradientTransformation:
    """Moonlight's optimizer (paper Sec. 2.2): `muon` plus AdamW, one lr and wd.

    Leaves labelled "muon" get W <- W - lr (rms_scale sqrt(max(A,B)) O + wd W);
    leaves labelled "adamw" get AdamW(adam_b1, adam_b2, adam_eps) with the same
    learning rate and weight decay. `labels` maps the params to a tree of
    "muon" / "adamw"; by default `moonlight_labels`.

    Args:
      update_scale: Muon's update-scale rule, one of `UPDATE_SCALE_RULES`
        (paper Sec. 3.1; see `scale_by_shape`); "moonlight" is Eq. 7.
      hidden_size: the model width H, required by update_scale="hidden".
      compute_dtype: dtype of Muon's Newton-Schulz iterations.
      adamw_weight_decay: the AdamW group's decoupled weight decay; None means
        `weight_decay`, the paper's choice.
      decay_norms_and_biases: if False, AdamW leaves with ndim < 2 and leaves
        whose last path key is "scale" or "bias" (norm scales and biases,
        scanned ones included) get no weight decay.
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
                update_scale=update_scale,
                hidden_size=hidden_size,
                eps=eps,
                mu_dtype=mu_dtype,
                matrix_axes=matrix_axes,
                compute_dtype=compute_dtype,
                orthogonalize_with=orthogonalize_with,
            ),
            ADAMW: optax.adamw(
                learning_rate,
                b1=adam_b1,
                b2=adam_b2,
                eps=adam_eps,
                weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
                mu_dtype=mu_dtype,
                mask=None if decay_norms_and_biases else weight_decay_mask,
            ),
        },
        moonlight_labels if labels is None else labels,
    )
