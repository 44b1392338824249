"""QK-Clip (MuonClip, Kimi K2): keep every attention head's logits at or below tau.

After an optimizer step, each head h whose max pre-softmax logit S_h in that
step (after the softmax scale, over the whole global batch) exceeded tau gets
gamma_h = tau / S_h, and its query and key weights are rescaled so that its
logits, which are bilinear in them, shrink by gamma_h:

- MHA: the head's query and key features each times sqrt(gamma_h);
- MLA: the head's q_nope and k_nope features (its slices of the query
  projection and of the key up-projection `kv_b`) times sqrt(gamma_h), its
  q_rope features times gamma_h, and the rotary key that all heads share
  untouched (scaling it would rescale every head).

Heads with S_h <= tau are multiplied by exactly 1: bit-identical. The rule only
scales parameters, so it is independent of the optimizer and its state.

Describe your model by a function of each parameter's path and value that
returns a `QKHeads` for the query and key parameters and None for the rest,
and pass the per-layer, per-head max logits (layers, heads) of the step's
forward pass (the max over data-parallel devices and micro-batches):

    def heads(path, leaf):       # params["layers"]["wq"|"wk"]: (layers, embed, heads * 64)
        name = jax.tree_util.keystr(path)
        if name.endswith("['wq']") or name.endswith("['wk']"):
            return muonjax.QKHeads(layers=slice(None), head_dim=64, parts=((0, 64, 0.5),))
        return None

    params = muonjax.apply_qk_clip(params, max_logits_LH, 100.0, heads)   # after the update
    # or inside an optax chain, as its last element:
    tx = optax.chain(muonjax.moonlight(3e-4), muonjax.qk_clip(100.0, heads))
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=max_logits_LH)

With grouped-query attention a key head serves several query heads; scale the
query alone by gamma_h (parts ((0, head_dim, 1.0),) on the query, the key not
listed), which bounds each query head's logits just the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class QKHeads(NamedTuple):
    """How a query or key parameter holds the heads QK-Clip rescales.

    layers: the rows of max_logits (layers, heads) this parameter serves: an int
      for one layer's parameter, a slice for a stack whose leading axis runs
      over those layers (scanned layers).
    head_dim: features per head. The parameter's last axis holds
      heads x head_dim features, head-major (head h's are h * head_dim to
      (h + 1) * head_dim), or its last two axes are (heads, head_dim).
    parts: (start, stop, power) triples: features [start, stop) of every head
      are multiplied by gamma_h ** power (0.5 for a query or key that shares
      the logit with the other; 1.0 for a query part whose key is shared by all
      heads). Features in no part are left untouched.
    """

    layers: int | slice
    head_dim: int
    parts: Sequence[tuple[int, int, float]]


QKHeadsFn = Callable[[Any, jax.Array], QKHeads | None]


def qk_clip_factors(max_logits: jax.Array, tau) -> jax.Array:
    """gamma (layers, heads) float32: tau / S where S > tau, else exactly 1.

    A non-finite max logit (a step the trainer skips) gives 1, never 0 or NaN.
    """
    s = jnp.asarray(max_logits, jnp.float32)
    clip = jnp.isfinite(s) & (s > tau)
    return jnp.where(clip, tau / jnp.where(clip, s, 1.0), 1.0)


def _power(gamma, p: float):
    # exact for the usual powers: sqrt(1) and 1 ** 1 are 1, so unclipped heads stay bit-identical
    if p == 1.0:
        return gamma
    if p == 0.5:
        return jnp.sqrt(gamma)
    return gamma**p


def _check_parts(spec: QKHeads, where: str) -> None:
    spans = sorted((int(a), int(b)) for a, b, _ in spec.parts)
    bad = [(a, b) for a, b in spans if not 0 <= a < b <= spec.head_dim]
    overlap = any(b > a2 for (_, b), (a2, _) in zip(spans, spans[1:]))
    if bad or overlap or not spans:
        raise ValueError(
            f"QKHeads for {where}: parts {tuple(spec.parts)} must be non-empty, disjoint "
            f"[start, stop) ranges within the head's {spec.head_dim} features"
        )


def _factor(spec: QKHeads, gamma_LH: jax.Array, shape: tuple[int, ...], where: str) -> jax.Array:
    """The multiplier of a parameter of `shape`, broadcastable to it."""
    _check_parts(spec, where)
    n_layers, n_heads = gamma_LH.shape
    rows = gamma_LH[spec.layers]  # (H,) or (n, H)
    stacked = rows.ndim == 2
    k = spec.head_dim
    if shape[-1:] == (n_heads * k,):
        trailing = (n_heads * k,)
    elif shape[-2:] == (n_heads, k):
        trailing = (n_heads, k)
    else:
        raise ValueError(
            f"QKHeads for {where}: shape {tuple(shape)} does not end in heads x head_dim "
            f"({n_heads} x {k}, as max_logits has {n_heads} heads)"
        )
    if stacked and (len(shape) < 1 + len(trailing) or shape[0] != rows.shape[0]):
        raise ValueError(
            f"QKHeads for {where}: layers {spec.layers} selects {rows.shape[0]} of "
            f"{n_layers} layers, but the parameter's leading axis is "
            f"{shape[0] if shape else 'missing'} (shape {tuple(shape)})"
        )
    columns = []  # (..., H, 1) per feature range, then concatenated along the head's features
    at = 0
    for start, stop, p in sorted(spec.parts):
        if start > at:
            columns.append(jnp.ones((*rows.shape, start - at), rows.dtype))
        columns.append(jnp.repeat(_power(rows, p)[..., None], stop - start, axis=-1))
        at = stop
    if at < k:
        columns.append(jnp.ones((*rows.shape, k - at), rows.dtype))
    factor = jnp.concatenate(columns, axis=-1).reshape(*rows.shape[:-1], *trailing)
    if stacked:  # (n, *trailing) -> (n, 1, ..., 1, *trailing)
        middle = len(shape) - 1 - len(trailing)
        factor = factor.reshape(rows.shape[0], *(1,) * middle, *trailing)
    return factor


def _leaf_factor(heads: QKHeadsFn, gamma_LH: jax.Array, path, leaf) -> jax.Array | None:
    """One leaf's multiplier (broadcastable to it), or None for a leaf that is
    neither a query nor a key."""
    spec = heads(path, leaf)
    if spec is None:
        return None
    return _factor(spec, gamma_LH, leaf.shape, jax.tree_util.keystr(path) or "the parameter")


def apply_qk_clip(params: Any, max_logits: jax.Array, tau, heads: QKHeadsFn) -> Any:
    """`params` with the query / key features of every head whose max logit
    exceeded `tau` rescaled (see the module's docstring); the rest unchanged.

    Args:
      params: any pytree of parameters.
      max_logits: (layers, heads): each head's max logit (after the softmax
        scale) in the step, over the global batch.
      tau: the threshold (Kimi K2: 100).
      heads: `(path, leaf) -> QKHeads | None`, saying which leaves are queries
        or keys and how they hold the heads.
    """
    gamma_LH = qk_clip_factors(max_logits, tau)

    def one(path, leaf):
        f = _leaf_factor(heads, gamma_LH, path, leaf)
        return leaf if f is None else leaf * f.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def qk_clip(tau, heads: QKHeadsFn) -> optax.GradientTransformationExtraArgs:
    """QK-Clip as the last element of an optax chain: returns updates u' such
    that params + u' are `apply_qk_clip(params + u, max_logits, tau, heads)`
    (to rounding; u' = u exactly for leaves and heads left alone).

    Its update takes the step's max logits as an extra argument:
    `tx.update(grads, state, params, max_logits=max_logits_LH)`; optax.chain
    passes it through, and transformations without extra arguments ignore it.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, max_logits, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("qk_clip needs the parameters: tx.update(grads, state, params, ...)")
        gamma_LH = qk_clip_factors(max_logits, tau)

        def one(path, u, p):
            f = _leaf_factor(heads, gamma_LH, path, p)
            if f is None:
                return u
            # f (p + u) - p, written so that it is u itself (to the bit) where f is 1
            return jnp.where(f == 1.0, u, u + (f - 1.0) * (p + u)).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
