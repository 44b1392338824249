"""Float64 NumPy Muon written from the paper's equations (Eq. 1-4), for tests."""

import numpy as np

JORDAN = (3.4445, -4.7750, 2.0315)


def newton_schulz(x, coeffs, safety=1.0, eps=1e-7):
    """Eq. 1: X0 = x / ||x||_F, X <- a X + b (X X^T) X + c (X X^T)^2 X, per matrix."""
    x = np.asarray(x, np.float64)
    if x.ndim > 2:
        return np.stack([newton_schulz(m, coeffs, safety, eps) for m in x])
    if x.shape[0] > x.shape[1]:
        return newton_schulz(x.T, coeffs, safety, eps).T
    x = x / (safety * np.linalg.norm(x) + eps)
    for a, b, c in coeffs:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x


def muon_step(w, g, m, *, lr, wd, mu=0.95, nesterov=True, rms_scale=0.2, coeffs=(JORDAN,) * 5):
    """One step of Eq. 2-4 on a matrix or stack of matrices; returns (w, m)."""
    w, g, m = (np.asarray(a, np.float64) for a in (w, g, m))
    m = mu * m + g
    n = g + mu * m if nesterov else m
    o = newton_schulz(n, coeffs)
    rows, cols = w.shape[-2:]
    w = w - lr * (rms_scale * np.sqrt(max(rows, cols)) * o + wd * w)
    return w, m
