"""The Moonlight recipe: Muon for hidden matrices, AdamW for everything else."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from muonjax.optim.checks import check_number, check_rate
from muonjax.optim.matrix_axes import MatrixAxesFn
from muonjax.optim.muon import muon
from muonjax.optim.newton_schulz import CoefficientsLike
from muonjax.optim.paths import key_name, path_names

MUON, ADAMW = "muon", "adamw"


# Whole path keys, compared ignoring case, that send a leaf to AdamW by default.
ADAMW_NAMES = (
    "lm_head",  # output layers: Hugging Face and Flax language models,
    "head",  # timm / ViT classifiers,
    "classifier",  # Hugging Face classifiers
    "wte",  # embeddings: nanoGPT / GPT-2 (token, position),
    "wpe",
    "tok_emb",  # minGPT-style (token, position)
    "pos_emb",
    "scale",  # Flax norms (a scanned norm's (layers, D) scale too)
    "bias",
)


def moonlight_labels(
    params: Any,
    *,
    adamw_names: str | Sequence[str] = (),
    adamw_if: Callable[[Any, Any], bool] | None = None,
) -> Any:
    """Labels each leaf "muon" or "adamw", as `moonlight` routes it by default.

    Muon is for hidden matrices; the token embedding, the output layer, norms
    and biases go to AdamW (paper Sec. 2.2). A leaf goes to AdamW when any of:

      1. it has fewer than 2 axes (scalars, vectors);
      2. a key on its path contains "embed", ignoring case ('embed',
         'embedding', 'embed_tokens', 'pos_embed', 'word_embeddings', ...);
      3. a key on its path equals, ignoring case, one of `ADAMW_NAMES` ("lm_head",
         "head", "classifier", "wte", "wpe", "tok_emb", "pos_emb", "scale",
         "bias") or of `adamw_names`: whole keys, so "head" matches ('head',
         'kernel') but not 'heads' or 'q_head';
      4. `adamw_if(path, leaf)` is true.

    Every other leaf goes to Muon. A path's keys are dict keys, attribute names
    (an `nnx.State`'s trailing 'value' included) and sequence indices, as
    `jax.tree_util` names them. "output" is deliberately not a default: in
    BERT-style models ('layer', '0', 'output', 'dense') holds a hidden matrix;
    where it is the final layer (Meta's Llama checkpoints), add it.

    Args:
      params: a pytree of arrays or `jax.ShapeDtypeStruct`s (nested dicts,
        `nnx.State`, ...).
      adamw_names: more whole path keys that send a leaf to AdamW, on top of
        `ADAMW_NAMES`, e.g. ("output",); a single string is one name.
      adamw_if: a predicate `(path, leaf) -> bool` of a leaf's key path (as
        `jax.tree_util.tree_map_with_path` gives it) and value; True sends the
        leaf to AdamW.

    Returns:
      A pytree like `params` with "muon" or "adamw" at each leaf. Use it in
      `moonlight` as `labels=functools.partial(moonlight_labels, adamw_names=...)`.

    References:
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025).
    """
    names = {n.lower() for n in ADAMW_NAMES}
    names.update(
        n.lower() for n in ((adamw_names,) if isinstance(adamw_names, str) else adamw_names)
    )

    def label(path, leaf):
        keys = [key_name(k).lower() for k in path]
        if (
            jnp.ndim(leaf) < 2
            or any("embed" in k or k in names for k in keys)
            or (adamw_if is not None and adamw_if(path, leaf))
        ):
            return ADAMW
        return MUON

    return jax.tree_util.tree_map_with_path(label, params)


def _last_name(path: Any) -> str:
    names = path_names(path)
    return names[-1].lower() if names else ""


def weight_decay_mask(params: Any) -> Any:
    """True for each leaf that gets weight decay when norms and biases do not.

    decays(leaf) = ndim(leaf) >= 2 and last path key not in {"scale", "bias"}
    (an `nnx.State`'s trailing 'value' key skipped), so a scanned (layers, D)
    norm scale gets none either.

    Args:
      params: a pytree of arrays or `jax.ShapeDtypeStruct`s.

    Returns:
      A pytree of bools like `params`: the `mask` of the AdamW group of
      `moonlight(decay_norms_and_biases=False)`, or of `optax.adamw`.

    References:
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025).
    """

    def decays(path, leaf):
        return not (jnp.ndim(leaf) < 2 or _last_name(path) in ("scale", "bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def _computed_in(dtype: Any, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on copies of the floating updates and params widened to `dtype`.

    Its state is built from the widened params (so Adam's moments are kept in
    `dtype`), and its updates are cast back to each incoming update's dtype.
    """
    dtype = jnp.dtype(dtype)

    def widen(tree):
        def cast(x):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            return x.astype(jnp.promote_types(x.dtype, dtype))

        return None if tree is None else jax.tree.map(cast, tree)

    def init_fn(params):
        return inner.init(widen(params))

    def update_fn(updates, state, params=None):
        new_updates, state = inner.update(widen(updates), state, widen(params))
        new_updates = jax.tree.map(lambda n, u: n.astype(u.dtype), new_updates, updates)
        return new_updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def moonlight(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int | None = None,
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
    adam_dtype: Any | None = "float32",
    adamw_weight_decay: float | None = None,
    decay_norms_and_biases: bool = True,
    labels: Callable[[Any], Any] | None = None,
    adamw_names: str | Sequence[str] = (),
    adamw_if: Callable[[Any, Any], bool] | None = None,
    matrix_axes: MatrixAxesFn | None = None,
    mesh: Any | None = None,
    spread_axes: Sequence[str] | None = None,
    update_specs: Callable[[Any, jax.Array], Any] | None = None,
) -> optax.GradientTransformation:
    """Moonlight's optimizer: Muon for hidden matrices, AdamW for the rest, one lr and wd.

    Paper Sec. 2.2 (Eq. 4). A leaf labelled "muon" (a matrix W of shape (A, B),
    or a stack of them) is updated by

        W <- W - lr * (rms_scale * sqrt(max(A, B)) * O + wd * W),
        O = NewtonSchulz(G + momentum * M),  M <- momentum * M + G,

    (see `muon`); a leaf labelled "adamw" by AdamW(adam_b1, adam_b2,
    adam_eps) with the same learning rate and weight decay, so AdamW's
    hyperparameters carry over. `labels` decides the groups; by default
    `moonlight_labels` (hidden matrices to Muon; embeddings, the output layer,
    norms and biases to AdamW).

    Every numeric argument is a plain value, so `optax.inject_hyperparams`
    works (name `ns_steps` in static_args if you pass it); `optax.tree_map_params` works
    with a one-argument function. With extra param-shaped trees (e.g. param
    shardings), each group's state holds `optax.MaskedNode` where the other
    group's leaves are, so pass `is_leaf=lambda x: isinstance(x,
    optax.MaskedNode)` and let the function return a MaskedNode for one.

    Args:
      learning_rate: a float or an optax schedule, for both groups.
      weight_decay: decoupled weight decay wd, for both groups (paper: 0.1).
      momentum: Muon's momentum coefficient (paper: 0.95).
      nesterov: Nesterov momentum for Muon (the paper's).
      ns_steps: Newton-Schulz iterations, a static int; None: 5, or the rows
        of a per-step `ns_coeffs` table.
      ns_coeffs: Newton-Schulz coefficients: "jordan", "polar_express", one
        (a, b, c) or an (ns_steps, 3) table.
      rms_scale: Muon's target update RMS (paper: 0.2, AdamW's typical RMS).
      update_scale: Muon's update-scale rule, one of `UPDATE_SCALE_RULES`
        (paper Sec. 3.1; see `scale_by_shape`); "moonlight" is Eq. 7.
      hidden_size: the model width H, required by update_scale="hidden".
      eps: added to ||N||_F before Newton-Schulz.
      mu_dtype: dtype of both groups' first moments; None keeps each param's
        dtype (AdamW's: see `adam_dtype`).
      compute_dtype: dtype of Muon's Newton-Schulz iterations.
      adam_b1: AdamW's first-moment decay (paper: 0.9).
      adam_b2: AdamW's second-moment decay (paper: 0.95).
      adam_eps: AdamW's epsilon (paper: 1e-8).
      adam_dtype: AdamW runs on copies of its updates and params widened to
        at least this dtype, so both moments are kept and computed in it
        (unless `mu_dtype` sets the first moment's), and its updates are cast
        back to each update's dtype. The default keeps bfloat16 params'
        moments in float32; None keeps the params' dtype, as optax does.
      adamw_weight_decay: the AdamW group's decoupled weight decay; None means
        `weight_decay`, the paper's choice.
      decay_norms_and_biases: if False, AdamW leaves with ndim < 2 and leaves
        whose last path key is "scale" or "bias" (norm scales and biases,
        scanned ones included) get no weight decay (see `weight_decay_mask`).
      labels: a function of the params returning a tree of "muon" / "adamw"
        (or such a tree); None means `moonlight_labels` with `adamw_names` and
        `adamw_if`. Any other label is an error naming its leaf.
      adamw_names, adamw_if: extend the default routing (see
        `moonlight_labels`), e.g. `adamw_names=("output",)`; not with `labels`.
        Under `optax.inject_hyperparams` name it in static_args.
      matrix_axes: `(path, leaf) -> MatrixAxes | None` for Muon leaves whose
        matrix is not their last two axes.
      mesh: the mesh Muon spreads Newton-Schulz over (see `scale_by_muon`).
      spread_axes: its axes to spread over (see `scale_by_muon`).
      update_specs: the layout of each Muon leaf's update under Auto mesh axes
        (see `scale_by_muon`).

    Returns:
      An `optax.GradientTransformation` (an `optax.partition` of `muon` and
      AdamW).

    References:
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025).
    """
    check_rate("learning_rate", learning_rate)
    check_number("weight_decay", weight_decay)
    if adamw_weight_decay is not None:
        check_number("adamw_weight_decay", adamw_weight_decay)
    for name, beta in (("adam_b1", adam_b1), ("adam_b2", adam_b2)):
        check_number(name, beta, 0.0, 1.0, high_open=True)
    check_number("adam_eps", adam_eps)
    wd = weight_decay if adamw_weight_decay is None else adamw_weight_decay  # AdamW's
    adamw = _adamw_group(
        learning_rate, wd, adam_b1, adam_b2, adam_eps, mu_dtype, adam_dtype, decay_norms_and_biases
    )
    hidden = muon(
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
        mesh=mesh,
        spread_axes=spread_axes,
        update_specs=update_specs,
    )
    return optax.partition({MUON: hidden, ADAMW: adamw}, _routing(labels, adamw_names, adamw_if))


def _routing(labels: Any, adamw_names: Any, adamw_if: Any) -> Any:
    """`moonlight`'s labels: `labels` (a tree, or a function of the params giving
    one), else `moonlight_labels` with `adamw_names` and `adamw_if`; every leaf
    must be "muon" or "adamw", and any other is a ValueError naming the leaf."""
    if labels is None:
        labels = functools.partial(moonlight_labels, adamw_names=adamw_names, adamw_if=adamw_if)
    elif adamw_names or adamw_if is not None:
        raise ValueError("pass labels, or adamw_names / adamw_if to extend the default: not both")

    def check(tree):
        def one(path, label):
            if not isinstance(label, str) or label not in (MUON, ADAMW):
                where = jax.tree_util.keystr(path) or "<root>"
                raise ValueError(
                    f"labels gave {label!r} for {where}: each leaf is 'muon' or 'adamw'"
                )
            return label

        return jax.tree_util.tree_map_with_path(one, tree)

    return (lambda params: check(labels(params))) if callable(labels) else check(labels)


def _adamw_group(learning_rate, weight_decay, b1, b2, eps, mu_dtype, adam_dtype, decay_all):
    """Moonlight's AdamW group: `optax.adamw`, decaying every leaf or (`decay_all`
    False) those of `weight_decay_mask`, run on copies widened to at least
    `adam_dtype` (None: in the params' dtype, as optax does)."""
    mask = None if decay_all else weight_decay_mask
    adamw = optax.adamw(
        learning_rate, b1, b2, eps, mu_dtype=mu_dtype, weight_decay=weight_decay, mask=mask
    )
    return adamw if adam_dtype is None else _computed_in(adam_dtype, adamw)
