"""Newton-Schulz orthogonalization: the O = NewtonSchulz5(N / ||N||_F) of Muon."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Coefficients = tuple[tuple[float, float, float], ...]
CoefficientsLike = str | Sequence[float] | Sequence[Sequence[float]]

# Keller Jordan's quintic, tuned for slope at zero (paper Sec. 2.1): repeated
# every step. It drives singular values into about [0.7, 1.2], not to 1.
JORDAN = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al. 2025, arXiv 2505.16932): one optimal quintic per
# step for 5 steps, computed for l=1e-3 with a 2% safety margin; the input is
# divided by 1.02 * ||X||_F so that no singular value starts above 1/1.02.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02

NAMED_COEFFICIENTS = ("jordan", "polar_express")


def resolve_coefficients(
    ns_coeffs: CoefficientsLike, ns_steps: int | None = None
) -> tuple[Coefficients, float]:
    """Returns the per-step (a, b, c) table and the normalization safety factor.

    Step k of Newton-Schulz maps X to a_k X + b_k (X X^T) X + c_k (X X^T)^2 X,
    i.e. each singular value s to p_k(s) = a_k s + b_k s^3 + c_k s^5. A single
    (a, b, c) is repeated `ns_steps` times (Jordan's quintic, `JORDAN`;
    default 5 steps); a per-step table (n, 3) fixes the number of steps
    itself, so `ns_steps` must be None or n. The safety factor s >= 1 divides the input by s ||X||_F: 1.0,
    except 1.02 for "polar_express" (`POLAR_EXPRESS_SAFETY`), whose
    polynomials are optimal only for singular values in (0, 1/1.02].

    Args:
      ns_coeffs: "jordan" (`JORDAN`, the paper's), "polar_express"
        (`POLAR_EXPRESS`, one quintic per step for 5 steps), one (a, b, c), or
        an (n, 3) per-step table.
      ns_steps: the number of Newton-Schulz steps, a static Python int >= 1;
        None: 5, or the rows of a per-step table. (None also keeps
        `optax.inject_hyperparams` from turning the default into a traced
        value.)

    Returns:
      (table, safety): a tuple of `ns_steps` (a, b, c) float triples, and the
      normalization safety factor (a float >= 1).

    Raises:
      TypeError: if `ns_steps` is not a Python int (e.g. a traced value under
        `optax.inject_hyperparams` without static_args=("ns_steps",)).
      ValueError: if `ns_steps` < 1, `ns_coeffs` is an unknown name or not of
        shape (3,) or (n, 3), or a per-step table has n != `ns_steps` rows.

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural
      networks" (2024), https://kellerjordan.github.io/posts/muon/.
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025),
      Sec. 2.1.
      Amsel et al., "The Polar Express: Optimal Matrix Sign Methods and Their
      Application to the Muon Algorithm", arXiv 2505.16932 (2025).
    """
    if ns_steps is not None and (isinstance(ns_steps, bool) or not isinstance(ns_steps, int)):
        raise TypeError(
            f"ns_steps must be a static Python int, got {ns_steps!r}; under "
            "optax.inject_hyperparams pass static_args=('ns_steps',)."
        )
    if ns_steps is not None and ns_steps < 1:
        raise ValueError(f"ns_steps must be at least 1, got {ns_steps}.")
    safety = 1.0
    if isinstance(ns_coeffs, str):
        if ns_coeffs == "jordan":
            ns_coeffs = JORDAN
        elif ns_coeffs == "polar_express":
            ns_coeffs, safety = POLAR_EXPRESS, POLAR_EXPRESS_SAFETY
        else:
            raise ValueError(
                f"Unknown ns_coeffs {ns_coeffs!r}; valid names: "
                f"{', '.join(NAMED_COEFFICIENTS)}, or an (a, b, c) tuple, or an "
                "(n, 3) per-step table."
            )
    try:
        table = tuple(tuple(float(c) for c in row) for row in ns_coeffs)
        per_step = True
    except TypeError:  # a flat (a, b, c): its entries are not iterable
        table = (tuple(float(c) for c in ns_coeffs),)
        per_step = False
    if not table or any(len(row) != 3 for row in table):
        raise ValueError(
            "ns_coeffs must be (a, b, c) or an (n, 3) table of per-step "
            f"coefficients, got {ns_coeffs!r}."
        )
    if not per_step:
        return table * (5 if ns_steps is None else ns_steps), safety
    if ns_steps is not None and len(table) != ns_steps:
        raise ValueError(
            f"ns_coeffs is a per-step table of {len(table)} steps but "
            f"ns_steps={ns_steps}; pass ns_steps={len(table)} or a table of "
            f"{ns_steps} rows."
        )
    return table, safety


def _gram_form(m: int, n: int, steps: int, compute_dtype: Any = "float32") -> bool:
    """Whether to iterate on the m x m Gram matrix: it costs fewer FLOPs (n > 1.5 m),
    and float32 only. In bfloat16 it breaks down: Q_k carries 1 / s for the
    smallest singular values s (hundreds), so one rounding of it (2^-8) throws the
    largest ones far from 1; on a momentum-like low-rank-plus-noise matrix the
    output's singular values reached 270-14,000 (experiments/ns_dtype.py found it)."""
    return steps > 1 and 2 * n > 3 * m and jnp.dtype(compute_dtype) == jnp.float32


def orthogonalize(
    x: jax.Array,
    *,
    ns_steps: int | None = None,
    ns_coeffs: CoefficientsLike = "jordan",
    eps: float = 1e-7,
    compute_dtype: Any = "float32",
) -> jax.Array:
    """Approximates U V^T of x = U S V^T on the last two axes by Newton-Schulz.

    X_0 = x / (safety * ||x||_F + eps), then X <- a X + (b A + c A^2) X with
    A = X X^T, on the short side m (paper Sec. 2.1, Eq. 1). Leading axes are a
    batch (stacked layers, experts). Returns x's dtype; computes in
    `compute_dtype` (float32, or bfloat16 for speed on accelerators).

    Each step maps every singular value s of X to a s + b s^3 + c s^5 and keeps
    the singular vectors, so the result is U p(S) V^T: with Jordan's quintic
    p(S) lies in about [0.7, 1.2] rather than at 1 (the paper's
    NewtonSchulz5); dividing by ||x||_F >= ||x||_2 first puts every s in
    (0, 1], where the iteration converges. A tall matrix is transposed first,
    which commutes with the iteration.

    For a long side n > 1.5 m the same polynomial is evaluated in m x m space
    (every iterate is X_k = Q_k X_0 with Q_k a polynomial of A_0), which costs
    4 m^2 n + (8k - 6) m^3 FLOPs instead of k (4 m^2 n + 2 m^3); in float32
    only, as it is unstable in bfloat16.

    Args:
      x: a matrix (A, B) or a stack of them (..., A, B), real floating point.
      ns_steps: the number of Newton-Schulz steps k, a static Python int;
        None: 5, or the rows of a per-step table.
      ns_coeffs: "jordan", "polar_express", one (a, b, c), or an
        (ns_steps, 3) per-step table (see `resolve_coefficients`).
      eps: added to safety * ||x||_F, so that a zero matrix stays zero.
      compute_dtype: the dtype of the iterations; the norm and the
        normalization are computed in float32 whatever it is.

    Returns:
      An array of x's shape and dtype: each matrix replaced by its
      approximate orthogonal factor U p(S) V^T.

    Raises:
      ValueError: if x has fewer than 2 axes, or `ns_coeffs` / `ns_steps` are
        invalid (see `resolve_coefficients`).
      TypeError: if `ns_steps` is not a Python int.

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural
      networks" (2024), https://kellerjordan.github.io/posts/muon/.
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025),
      Sec. 2.1, Eq. 1.
      Amsel et al., "The Polar Express: Optimal Matrix Sign Methods and Their
      Application to the Muon Algorithm", arXiv 2505.16932 (2025), for
      ns_coeffs="polar_express".
    """
    if x.ndim < 2:
        raise ValueError(
            f"orthogonalize needs a matrix or a stack of matrices (ndim >= 2), got shape {x.shape}."
        )
    table, safety = resolve_coefficients(ns_coeffs, ns_steps)
    out_dtype = x.dtype
    x = x.astype(jnp.float32)
    # Work on the short side m: transposing a tall matrix makes every product
    # cheaper, and the iteration commutes with transposition.
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    x = (x / (safety * norm + eps)).astype(compute_dtype)
    m, n = x.shape[-2:]
    # Matmuls take `compute_dtype` inputs and accumulate into `acc` (float32
    # for bfloat16); the coefficients and every elementwise (scalar) product
    # stay in `acc`, and each result is rounded once to `compute_dtype` where a
    # matmul reads it, as PyTorch's bfloat16 arithmetic does. A Python float
    # times a bfloat16 array would round the coefficients themselves to
    # bfloat16. For float32 compute every cast below is a no-op.
    cdt = x.dtype
    acc = jnp.promote_types(cdt, jnp.float32)
    table = tuple(tuple(jnp.asarray(v, acc) for v in row) for row in table)

    def mm(p: jax.Array, q: jax.Array) -> jax.Array:
        return jnp.matmul(p.astype(cdt), q.astype(cdt), preferred_element_type=acc)

    gram = jnp.einsum("...ik,...jk->...ij", x, x, preferred_element_type=acc)
    if _gram_form(m, n, len(table), cdt):
        # A_{k+1} = M_k A_k M_k and Q_{k+1} = M_k Q_k, M_k = aI + b A_k + c A_k^2:
        # all polynomials of A_0, so they commute; X_k = Q_k X_0 at the end.
        eye = jnp.eye(m, dtype=acc)
        q = None
        for i, (a, b, c) in enumerate(table):
            poly = (a * eye + b * gram + c * mm(gram, gram)).astype(cdt)
            q = poly if q is None else mm(poly, q).astype(cdt)
            if i + 1 < len(table):
                gram = mm(mm(gram, poly), poly)
        x = mm(q, x)
    else:
        for i, (a, b, c) in enumerate(table):
            if i:
                gram = jnp.einsum("...ik,...jk->...ij", x, x, preferred_element_type=acc)
            ax = a * x.astype(acc)  # first, as before: float32 HLO unchanged
            x = ax + mm((b * gram + c * mm(gram, gram)).astype(cdt), x)
            if i + 1 < len(table):
                x = x.astype(cdt)
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(out_dtype)


def newton_schulz_flops(
    shape: Sequence[int], ns_steps: int = 5, compute_dtype: Any = "float32"
) -> int:
    """Matmul FLOPs `orthogonalize` spends on an array of `shape`.

    With m <= n the short and long sides of each (rows, cols) matrix and
    k = `ns_steps`, one matrix costs

        k (4 m^2 n + 2 m^3)            standard form: per step X X^T (2 m^2 n),
                                       A^2 (2 m^3) and (b A + c A^2) X (2 m^2 n)
        4 m^2 n + (8k - 6) m^3         Gram form (n > 1.5 m, k > 1, float32):
                                       A_0 and Q_k X_0 (2 m^2 n each), then m x m
                                       products

    counting 2 FLOPs per multiply-add and no elementwise work; leading axes
    multiply it by the stack size.

    Args:
      shape: the array's shape, (..., rows, cols) with at least 2 entries.
      ns_steps: the number of Newton-Schulz steps k.
      compute_dtype: `orthogonalize`'s; bfloat16 never takes the Gram form.

    Returns:
      The total matmul FLOPs over every matrix of the stack, as an int.

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural
      networks" (2024), https://kellerjordan.github.io/posts/muon/.
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025),
      Sec. 2.3 (the latency of Newton-Schulz in Distributed Muon).
    """
    *batch, rows, cols = shape
    m, n, k = min(rows, cols), max(rows, cols), ns_steps
    per_matrix = (
        4 * m * m * n + (8 * k - 6) * m**3
        if _gram_form(m, n, k, compute_dtype)
        else k * (4 * m * m * n + 2 * m**3)
    )
    return math.prod(batch) * per_matrix
