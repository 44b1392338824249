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


def resolve_coefficients(ns_coeffs: CoefficientsLike, ns_steps: int) -> tuple[Coefficients, float]:
    """Returns the per-step (a, b, c) table and the normalization safety factor.

    A single (a, b, c) is repeated `ns_steps` times; a per-step table (n, 3)
    fixes the number of steps itself, so `ns_steps` must equal n.
    """
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int):
        raise TypeError(
            f"ns_steps must be a static Python int, got {ns_steps!r}; under "
            "optax.inject_hyperparams pass static_args=('ns_steps',)."
        )
    if ns_steps < 1:
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
        return table * ns_steps, safety
    if len(table) != ns_steps:
        raise ValueError(
            f"ns_coeffs is a per-step table of {len(table)} steps but "
            f"ns_steps={ns_steps}; pass ns_steps={len(table)} or a table of "
            f"{ns_steps} rows."
        )
    return table, safety


def _gram_form(m: int, n: int, steps: int) -> bool:
    """Whether iterating on the m x m Gram matrix costs fewer FLOPs (n > 1.5 m)."""
    return steps > 1 and 2 * n > 3 * m


def orthogonalize(
    x: jax.Array,
    *,
    ns_steps: int = 5,
    ns_coeffs: CoefficientsLike = "jordan",
    eps: float = 1e-7,
    compute_dtype: Any = "float32",
) -> jax.Array:
    """Approximates U V^T of x = U S V^T on the last two axes by Newton-Schulz.

    X_0 = x / (safety * ||x||_F + eps), then X <- a X + (b A + c A^2) X with
    A = X X^T, on the short side m (paper Sec. 2.1, Eq. 1). Leading axes are a
    batch (stacked layers, experts). Returns x's dtype; computes in
    `compute_dtype` (float32, or bfloat16 for speed on accelerators).

    For a long side n > 1.5 m the same polynomial is evaluated in m x m space
    (every iterate is X_k = Q_k X_0 with Q_k a polynomial of A_0), which costs
    4 m^2 n + (8k - 6) m^3 FLOPs instead of k (4 m^2 n + 2 m^3).
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
    gram = jnp.einsum("...ik,...jk->...ij", x, x)
    if _gram_form(m, n, len(table)):
        # A_{k+1} = M_k A_k M_k and Q_{k+1} = M_k Q_k, M_k = aI + b A_k + c A_k^2:
        # all polynomials of A_0, so they commute; X_k = Q_k X_0 at the end.
        eye = jnp.eye(m, dtype=x.dtype)
        q = None
        for i, (a, b, c) in enumerate(table):
            poly = a * eye + b * gram + c * (gram @ gram)
            q = poly if q is None else poly @ q
            if i + 1 < len(table):
                gram = (gram @ poly) @ poly
        x = q @ x
    else:
        for i, (a, b, c) in enumerate(table):
            if i:
                gram = jnp.einsum("...ik,...jk->...ij", x, x)
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(out_dtype)


def newton_schulz_flops(shape: Sequence[int], ns_steps: int = 5) -> int:
    """Matmul FLOPs `orthogonalize` spends on an array of `shape`."""
    *batch, rows, cols = shape
    m, n, k = min(rows, cols), max(rows, cols), ns_steps
    per_matrix = (
        4 * m * m * n + (8 * k - 6) * m**3
        if _gram_form(m, n, k)
        else k * (4 * m * m * n + 2 * m**3)
    )
    return math.prod(batch) * per_matrix
