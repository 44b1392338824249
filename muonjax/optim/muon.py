"""Muon as optax gradient transformations (paper Eq. 1-4)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from muonjax.optim.checks import check_number, check_rate
from muonjax.optim.distributed import explicit_axes, orthogonalize_spread, resolve_mesh
from muonjax.optim.matrix_axes import MatrixAxesFn, MatrixView, map_matrices
from muonjax.optim.newton_schulz import (
    CoefficientsLike,
    orthogonalize,
    resolve_coefficients,
)


class ScaleByMuonState(NamedTuple):
    """State of `scale_by_muon`."""

    mu: optax.Updates  # momentum M, like params: same shapes, dtype mu_dtype or the param's


def muon_momentum(state: Any) -> Any:
    """Muon's momentum M (`ScaleByMuonState.mu`) from an optimizer state holding
    one Muon: `muon`'s or `moonlight`'s (whose AdamW leaves are `optax.MaskedNode`
    there), also inside `inject_hyperparams`, `MultiSteps` and other wrappers.
    `optax.tree_utils.tree_get(state, "mu")` finds AdamW's `mu` as well."""
    is_muon = lambda x: isinstance(x, ScaleByMuonState)  # noqa: E731
    found = [x for x in jax.tree.leaves(state, is_leaf=is_muon) if is_muon(x)]
    if len(found) != 1:
        raise ValueError(f"the state holds {len(found)} Muon states (ScaleByMuonState), not one")
    return found[0].mu


def _matrix_views(matrix_axes: MatrixAxesFn | None, tree: Any) -> list[MatrixView]:
    views: list[MatrixView] = []
    map_matrices(lambda path, view, leaf: views.append(view), matrix_axes, tree)
    return views


def scale_by_muon(
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int | None = None,
    ns_coeffs: CoefficientsLike = "jordan",
    eps: float = 1e-7,
    mu_dtype: Any | None = None,
    matrix_axes: MatrixAxesFn | None = None,
    compute_dtype: Any = "float32",
    mesh: Any | None = None,
    spread_axes: Sequence[str] | None = None,
    update_specs: Callable[[Any, jax.Array], Any] | None = None,
) -> optax.GradientTransformation:
    """Orthogonalized momentum, O = NewtonSchulz(N): paper Eq. 1-2.

    M <- momentum * M + G, N = G + momentum * M (Nesterov) or N = M, and each
    matrix of N is orthogonalized whole (see `orthogonalize`). Every leaf must
    be a real floating matrix or stack of matrices: by default its last two
    axes are the matrix, leading axes a stack; `matrix_axes` says otherwise.

    On a mesh (the one set by `jax.set_mesh`, or `mesh`), Newton-Schulz is
    spread over its devices: the update's matrices are packed into a few
    stacks split over every device, so that each device orthogonalizes whole
    matrices of its own (about 1 / devices of the work; see
    `muonjax.optim.distributed`), and the result is returned in the updates'
    sharding. This works under Auto and Explicit mesh axes and equals the
    unsharded update to float32 rounding.

    Args:
      momentum: the momentum coefficient mu (paper: 0.95).
      nesterov: N = G + mu M (True, the paper's) or N = M.
      ns_steps: Newton-Schulz iterations, a static int; None: 5, or the rows
        of a per-step `ns_coeffs` table.
      ns_coeffs: "jordan" (Keller Jordan's quintic, the paper's), "polar_express",
        one (a, b, c) or an (ns_steps, 3) table.
      eps: added to ||N||_F before normalizing.
      mu_dtype: dtype of M; None keeps each param's dtype.
      matrix_axes: `(path, leaf) -> MatrixAxes | None` for leaves whose matrix
        is not their last two axes (see `muonjax.optim.matrix_axes`).
      compute_dtype: dtype of the Newton-Schulz iterations (float32 or bfloat16).
      mesh: the `jax.sharding.Mesh` to spread Newton-Schulz over when the update
        runs under `jax.jit` but not under `jax.set_mesh` (whose mesh is used
        first). Without either, each leaf is orthogonalized where it lives.
      spread_axes: the mesh axes Newton-Schulz is spread over; default: all
        of them (of size > 1).
      update_specs: `(path, leaf) -> PartitionSpec | None`, the layout each
        leaf's update arrives in, for Auto mesh axes (where arrays do not carry
        it; under Explicit axes it is read from their types). Known layouts
        let each device keep what it already holds (see
        `muonjax.optim.distributed`); without, the placement is a guess.

    Returns:
      An `optax.GradientTransformation` whose state is a `ScaleByMuonState`.

    References:
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025).
      Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024).
    """
    steps = len(resolve_coefficients(ns_coeffs, ns_steps)[0])  # fail now, not in jit
    check_number("momentum", momentum, 0.0, 1.0, high_open=True)
    check_number("eps", eps)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        _matrix_views(matrix_axes, params)  # shape and dtype check
        return ScaleByMuonState(
            mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
        )

    def orthogonalize_stack(x):
        return orthogonalize(
            x, ns_steps=ns_steps, ns_coeffs=ns_coeffs, eps=eps, compute_dtype=compute_dtype
        )

    def update_fn(updates, state, params=None):
        del params
        new_mu = jax.tree.map(lambda m, g: (momentum * m + g).astype(m.dtype), state.mu, updates)
        # N in the wider of both dtypes
        n_tree = jax.tree.map(lambda g, m: g + momentum * m if nesterov else m, updates, new_mu)
        directions = _orthogonalize_tree(
            n_tree, matrix_axes, orthogonalize_stack, mesh, steps, spread_axes, update_specs
        )
        directions = [o.astype(g.dtype) for o, g in zip(directions, jax.tree.leaves(updates))]
        return jax.tree.unflatten(jax.tree.structure(n_tree), directions), ScaleByMuonState(new_mu)

    return optax.GradientTransformation(init_fn, update_fn)


def _orthogonalize_tree(
    n_tree, matrix_axes, orthogonalize_stack, mesh, ns_steps, spread_axes, update_specs
) -> list[jax.Array]:
    """Each matrix of each leaf of `n_tree` orthogonalized, the leaves in tree
    order: spread over the mesh's devices where there is a mesh (see
    `scale_by_muon`), else each where it lies."""
    ns = jax.tree.leaves(n_tree)
    views = _matrix_views(matrix_axes, n_tree)
    context = jax.sharding.get_abstract_mesh()
    explicit = () if context.empty else explicit_axes(context)
    specs = _update_layouts(n_tree, explicit, update_specs)

    def orthogonalize_leaves(ns):
        where = resolve_mesh(mesh)
        if where is None:
            return [v.from_matrix(orthogonalize_stack(v.to_matrix(n))) for v, n in zip(views, ns)]
        return orthogonalize_spread(
            ns, views, orthogonalize_stack, where, ns_steps, spread_axes, specs
        )

    if explicit and ns:
        # Sharded types would forbid the reshapes and products of a
        # whole-matrix layout: let the compiler place them, and return
        # each leaf in its own sharding.
        shardings = [jax.typeof(n).sharding for n in ns]
        orthogonalize_leaves = jax.sharding.auto_axes(
            orthogonalize_leaves, axes=explicit, out_sharding=shardings
        )
    return orthogonalize_leaves(ns)


def _update_layouts(n_tree, explicit: tuple[str, ...], update_specs) -> list | None:
    """Where each leaf of `n_tree` lies: in its type under Explicit axes, else as
    `update_specs` tells; None when unknown."""
    if explicit:
        return [jax.typeof(n).sharding.spec for n in jax.tree.leaves(n_tree)]
    if update_specs is not None:
        return [update_specs(path, n) for path, n in jax.tree_util.tree_leaves_with_path(n_tree)]
    return None


def _scale_moonlight(view, u, rms_scale, hidden_size):
    return u * (rms_scale * max(view.rows_cols) ** 0.5)


def _scale_hidden(view, u, rms_scale, hidden_size):
    return u * (rms_scale * hidden_size**0.5)


def _scale_update_norm(view, u, rms_scale, hidden_size):
    # RMS per matrix of the stack, in (at least) float32 so bfloat16 updates
    # are not normalized by a rounded sum; the floor keeps a zero update zero.
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    o = view.to_matrix(u).astype(dtype)
    rms = jnp.sqrt(jnp.mean(jnp.square(o), axis=(-2, -1), keepdims=True))
    rms = jnp.maximum(rms, jnp.finfo(dtype).tiny)
    return view.from_matrix(o * (rms_scale / rms))


def _scale_jordan(view, u, rms_scale, hidden_size):
    fan_in, fan_out = view.rows_cols
    return u * max(1.0, fan_out / fan_in) ** 0.5


_SCALE_BY_RULE = {
    "moonlight": _scale_moonlight,
    "hidden": _scale_hidden,
    "update_norm": _scale_update_norm,
    "jordan": _scale_jordan,
}
# Update-scale rules of paper Sec. 3.1 (Table 1), plus Keller Jordan's original.
UPDATE_SCALE_RULES = tuple(_SCALE_BY_RULE)


def shape_scale(rule: str, view: MatrixView, rms_scale: float, hidden_size: Any) -> float:
    """The factor `rule` multiplies each matrix of `view` by, for the rules that
    depend on the shape alone (all but "update_norm"): the rule applied to 1."""
    return float(_SCALE_BY_RULE[rule](view, 1.0, rms_scale, hidden_size))


def check_update_scale(rule: str, hidden_size: Any) -> None:
    """ValueError for an unknown update-scale rule, or "hidden" without a valid hidden_size."""
    if rule not in _SCALE_BY_RULE:
        raise ValueError(
            f"Unknown update scale rule {rule!r}; valid rules: {', '.join(UPDATE_SCALE_RULES)}."
        )
    if rule == "hidden":
        if hidden_size is None:
            raise ValueError(
                "The 'hidden' update scale rule (paper Eq. 5) needs hidden_size, "
                "the model width H; got hidden_size=None."
            )
        # A traced value (optax.inject_hyperparams) cannot be checked here.
        if isinstance(hidden_size, numbers.Real) and hidden_size < 1:
            raise ValueError(f"hidden_size must be at least 1, got {hidden_size!r}.")


def scale_by_shape(
    *,
    rms_scale: float = 0.2,
    rule: str = "moonlight",
    hidden_size: int | None = None,
    matrix_axes: MatrixAxesFn | None = None,
) -> optax.GradientTransformation:
    """Scales each matrix's update to a target RMS, by one of the rules of Sec. 3.1.

    For each (A, B) = (fan_in, fan_out) matrix U of a leaf (a stack's
    matrices each on their own), by `rule`:

      "moonlight"    U * rms_scale * sqrt(max(A, B))   Eq. 7 "Adjusted LR" (Eq. 4)
      "hidden"       U * rms_scale * sqrt(hidden_size) Eq. 5 "Baseline"
      "update_norm"  U * rms_scale / RMS(U)            Eq. 6 "Update Norm"
      "jordan"       U * sqrt(max(1, B / A))           Keller Jordan's Muon

    An orthogonal A x B matrix has RMS 1 / sqrt(max(A, B)), so "moonlight"
    makes the update RMS about `rms_scale` whatever the shape, matching
    AdamW's (Sec. 2.2); "update_norm" makes it exactly `rms_scale` (RMS over
    the matrix's A * B entries, in float32); "hidden" uses one factor for
    every matrix, H being the model width (`hidden_size`, required). "jordan"
    is max(1, size(-2) / size(-1)) ** 0.5 of PyTorch's (out, in) layout, i.e.
    sqrt(max(1, fan_out / fan_in)); it ignores `rms_scale`, so pair it with
    Muon's own (larger) learning rate, not AdamW's.

    Args:
      rms_scale: the target update RMS (paper: 0.2, AdamW's typical RMS).
      rule: one of `UPDATE_SCALE_RULES`, above.
      hidden_size: the model width H, for rule="hidden".
      matrix_axes: `(path, leaf) -> MatrixAxes | None`, as for `scale_by_muon`.

    Returns:
      An `optax.GradientTransformation` without state.

    Raises:
      ValueError: for an unknown rule, or rule="hidden" without hidden_size.

    References:
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025),
      Sec. 2.2 and 3.1.
    """
    check_update_scale(rule, hidden_size)
    check_number("rms_scale", rms_scale)
    scale_rule = _SCALE_BY_RULE[rule]

    def update_fn(updates, state, params=None):
        del params

        def scale(path, view, u):
            return scale_rule(view, u, rms_scale, hidden_size).astype(u.dtype)

        return map_matrices(scale, matrix_axes, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(
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
    matrix_axes: MatrixAxesFn | None = None,
    compute_dtype: Any = "float32",
    mesh: Any | None = None,
    spread_axes: Sequence[str] | None = None,
    update_specs: Callable[[Any, jax.Array], Any] | None = None,
) -> optax.GradientTransformation:
    """Moonlight's Muon for matrices: W <- W - lr (rms_scale sqrt(max(A,B)) O + wd W).

    Paper Eq. 1-4, for each matrix W of shape (A, B) with gradient G:

        M = momentum * M + G
        N = G + momentum * M            (N = M without Nesterov)
        O = NewtonSchulz(N / ||N||_F)
        W = W - lr * (rms_scale * sqrt(max(A, B)) * O + weight_decay * W)

    The chain `scale_by_muon`, `scale_by_shape`, `optax.add_decayed_weights`,
    `optax.scale_by_learning_rate`. Every leaf must be a matrix or a stack of
    matrices; for a whole model use `moonlight`.

    Args:
      learning_rate: a float or an optax schedule.
      weight_decay: decoupled weight decay (paper: 0.1).
      momentum: the momentum coefficient (paper: 0.95).
      nesterov: N = G + momentum * M (the paper's) or N = M.
      ns_steps: Newton-Schulz iterations, a static int; None: 5, or the rows
        of a per-step `ns_coeffs` table.
      ns_coeffs: "jordan" (the paper's), "polar_express", one (a, b, c) or a
        per-step table.
      rms_scale: the target update RMS (paper: 0.2, AdamW's typical RMS).
      update_scale: how O is scaled, one of `UPDATE_SCALE_RULES` (see
        `scale_by_shape`): "moonlight" (Eq. 7, the default above), "hidden"
        (Eq. 5, needs `hidden_size`), "update_norm" (Eq. 6) or "jordan".
      hidden_size: the model width H, for update_scale="hidden".
      eps: added to ||N||_F before Newton-Schulz.
      mu_dtype: dtype of the momentum M; None keeps each param's dtype.
      matrix_axes: `(path, leaf) -> MatrixAxes | None` for leaves whose matrix
        is not their last two axes (see `muonjax.optim.matrix_axes`; for Flax
        NNX models `muonjax.nnx_matrix_axes(model)`).
      compute_dtype: dtype of the Newton-Schulz iterations (float32 or bfloat16).
      mesh: the mesh Newton-Schulz is spread over when not under
        `jax.set_mesh` (see `scale_by_muon`).
      spread_axes: the mesh axes to spread over (see `scale_by_muon`).
      update_specs: the layout of each leaf's update under Auto mesh axes (see
        `scale_by_muon`).

    Returns:
      An `optax.GradientTransformation`; its state holds `ScaleByMuonState`.

    References:
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025).
      Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024).
    """
    check_rate("learning_rate", learning_rate)
    check_number("weight_decay", weight_decay)
    return optax.chain(
        scale_by_muon(
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
            eps=eps,
            mu_dtype=mu_dtype,
            matrix_axes=matrix_axes,
            compute_dtype=compute_dtype,
            mesh=mesh,
            spread_axes=spread_axes,
            update_specs=update_specs,
        ),
        scale_by_shape(
            rms_scale=rms_scale,
            rule=update_scale,
            hidden_size=hidden_size,
            matrix_axes=matrix_axes,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
