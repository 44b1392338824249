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


def scaled_update(o, *, rms_scale=0.2, update_scale="moonlight", hidden_size=None):
    """The scaled update of Sec. 3.1 for O of shape (..., A, B), A fan-in, B fan-out."""
    rows, cols = o.shape[-2:]
    if update_scale == "moonlight":  # Eq. 7 (= Eq. 4): 0.2 O sqrt(max(A, B))
        return rms_scale * np.sqrt(max(rows, cols)) * o
    if update_scale == "hidden":  # Eq. 5: 0.2 O sqrt(H)
        return rms_scale * o * np.sqrt(hidden_size)
    if update_scale == "update_norm":  # Eq. 6: 0.2 O / RMS(O), RMS per matrix
        rms = np.sqrt(np.mean(o**2, axis=(-2, -1), keepdims=True))
        return rms_scale * o / rms
    if update_scale == "jordan":  # Keller Jordan: max(1, out / in) ** 0.5
        return o * np.sqrt(max(1.0, cols / rows))
    raise ValueError(update_scale)


def muon_step(
    w,
    g,
    m,
    *,
    lr,
    wd,
    mu=0.95,
    nesterov=True,
    rms_scale=0.2,
    coeffs=(JORDAN,) * 5,
    update_scale="moonlight",
    hidden_size=None,
):
    """One step of Eq. 2-4 (or Eq. 5-7) on a matrix or stack of matrices; returns (w, m)."""
    w, g, m = (np.asarray(a, np.float64) for a in (w, g, m))
    m = mu * m + g
    n = g + mu * m if nesterov else m
    o = newton_schulz(n, coeffs)
    u = scaled_update(o, rms_scale=rms_scale, update_scale=update_scale, hidden_size=hidden_size)
    w = w - lr * (u + wd * w)
    return w, m
