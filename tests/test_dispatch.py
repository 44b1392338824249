"""Expert dispatch methods against a float64 per-token loop: forward output and
every gradient, on uniform, skewed and decode-sized routing; and the `tiles`
method's compiled FLOPs (XLA cost analysis) against the routed FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muonjax.models.dispatch import routed_experts, tile_rows

METHODS = ["tiles", "blocks", "ragged_dot"]


def _silu_and_grad(z):
    sig = 1 / (1 + np.exp(-z))
    return z * sig, sig * (1 + z * (1 - sig))


def per_token_reference(x, experts, weights, gate, up, down, cot):
    """Per-token loop in float64: y_t = sum_j w_tj SwiGLU_{e_tj}(x_t), and the
    gradients of sum(y * cot) w.r.t. x, weights, gate, up and down. Ids >= E
    (another shard's experts) are skipped."""
    x, weights, gate, up, down, cot = (
        np.asarray(a, np.float64) for a in (x, weights, gate, up, down, cot)
    )
    y, dx, dw = np.zeros_like(x), np.zeros_like(x), np.zeros_like(weights)
    dgate, dup, ddown = np.zeros_like(gate), np.zeros_like(up), np.zeros_like(down)
    for t in range(x.shape[0]):
        for j, e in enumerate(np.asarray(experts[t])):
            if e >= gate.shape[0]:
                continue
            a, b = x[t] @ gate[e], x[t] @ up[e]
            act, dact = _silu_and_grad(a)
            h = act * b
            out = h @ down[e]
            y[t] += weights[t, j] * out
            dw[t, j] = out @ cot[t]
            dout = weights[t, j] * cot[t]
            ddown[e] += np.outer(h, dout)
            dh = down[e] @ dout
            da, db = dh * b * dact, dh * act
            dgate[e] += np.outer(x[t], da)
            dup[e] += np.outer(x[t], db)
            dx[t] += gate[e] @ da + up[e] @ db
    return y, (dx, dw, dgate, dup, ddown)


def _problem(T, D, F, E, K, routing, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)).astype(np.float32)
    gate, up = (rng.standard_normal((E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((E, F, D)).astype(np.float32) * 0.3
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    if routing == "one-expert":  # every token's first choice is expert 0
        experts[:, 0] = 0
        others = [rng.choice(np.arange(1, E), K - 1, replace=False) for _ in range(T)]
        experts[:, 1:] = np.stack(others).reshape(T, K - 1)
    elif routing == "other-shard":  # a third of the ids belong to another shard (id E)
        experts[rng.random((T, K)) < 1 / 3] = E
    weights = rng.random((T, K)).astype(np.float32)
    cot = rng.standard_normal((T, D)).astype(np.float32)
    return x, experts, weights, gate, up, down, cot


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape, routing",
    [
        ((64, 16, 24, 8, 2), "uniform"),
        ((64, 16, 24, 8, 2), "one-expert"),
        ((96, 16, 24, 4, 1), "one-expert"),  # k = 1: literally every token on expert 0
        ((64, 16, 24, 8, 2), "other-shard"),
        ((1, 16, 24, 8, 2), "uniform"),  # a decode step
    ],
    ids=["uniform", "skewed", "all-to-one", "other-shard", "decode-T1"],
)
def test_dispatch_equals_float64_per_token_loop(method, shape, routing):
    x, experts, weights, gate, up, down, cot = _problem(*shape, routing)
    ids = jnp.asarray(experts)
    run = lambda x, w, g, u, d: routed_experts(x, ids, w, g, u, d, method=method)
    loss = lambda *a: jnp.sum(run(*a) * cot)
    args = (x, weights, gate, up, down)
    y = jax.jit(run)(*args)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    y_ref, grads_ref = per_token_reference(x, experts, weights, gate, up, down, cot)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * np.abs(y_ref).max())
    for g, r, name in zip(grads, grads_ref, ["x", "weights_TK", "gate", "up", "down"]):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=name)


def test_tile_rows_keep_padding_small():
    for n, e in [(1, 8), (4, 16), (512, 8), (4096, 16), (6144, 64), (65536, 16), (10**6, 16)]:
        tile = tile_rows(n, e)
        assert tile >= 1 and tile & (tile - 1) == 0
        assert tile == 1 or (e * tile * 16 <= n), (n, e, tile)  # padding <= E*tile <= n/16
        assert e * 2 * tile * 16 > n  # and no smaller than it has to be
        assert (n + e * (tile - 1)) // tile < 33 * e  # gathered weights: < 33 stacks


@pytest.mark.parametrize("routing", ["uniform", "one-expert"])
def test_tiles_compiled_flops_are_the_routed_flops(routing):
    """XLA counts the whole expert layer (no loop to hide in): within 10% of
    the routed matmul FLOPs, 2*3*T*k*D*F forward and twice that backward, plus
    the tiles' padding rows; and nothing in it loops."""
    T, D, F, E, K = 256, 128, 128, 8, 2
    x, experts, weights, gate, up, down, cot = _problem(T, D, F, E, K, routing)
    ids = jnp.asarray(experts)
    run = lambda x, w, g, u, d: routed_experts(x, ids, w, g, u, d, method="tiles")
    grad = jax.grad(lambda *a: jnp.sum(run(*a) * cot), argnums=(0, 1, 2, 3, 4))
    args = (x, weights, gate, up, down)
    N = T * K
    tile = tile_rows(N, E)
    padded_rows = (N + E * (tile - 1)) // tile * tile
    assert padded_rows <= N * (1 + 1 / 16)
    forward = jax.jit(run).lower(*args).compile().cost_analysis()["flops"]
    both = jax.jit(grad).lower(*args).compile().cost_analysis()["flops"]
    routed = 2 * 3 * N * D * F
    assert forward == pytest.approx(routed * padded_rows / N, rel=0.10)
    assert both == pytest.approx(3 * routed * padded_rows / N, rel=0.10)
    assert forward <= 1.10 * routed and both <= 1.15 * 3 * routed
    for fn in (run, grad):
        jaxpr = str(jax.make_jaxpr(fn)(*args))
        assert "while" not in jaxpr and "scan" not in jaxpr
