"""chunked_cross_entropy: its loss and gradients against a float64 reference and
against the model's own path (Linear -> float32 -> optax CE -> weighted sum),
and its compiled memory against that path's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from muonjax.models.cross_entropy import chunked_cross_entropy
from muonjax.models.layers import Linear

T, D, V = 48, 16, 96
# T = 48: chunk 8 divides it, 5 does not (the last chunk is padded), 48 is one
# chunk and 100 is larger than T.
CHUNKS = (8, 5, 48, 100)
DTYPES = ("float32", "bfloat16")


def inputs(dtype, seed=0):
    """x (T, D) and w (D, V) in `dtype`, targets in [0, V), a third of the weights 0."""
    k = jax.random.split(jax.random.key(seed), 4)
    x_TD = jax.random.normal(k[0], (T, D)).astype(dtype)
    w_DV = (jax.random.normal(k[1], (D, V)) / np.sqrt(D) * 3).astype(dtype)
    targets_T = jax.random.randint(k[2], (T,), 0, V)
    weights_T = (jax.random.uniform(k[3], (T,)) > 1 / 3).astype(jnp.float32)
    return x_TD, w_DV, targets_T, weights_T


def reference_f64(x_TD, w_DV, targets_T, weights_T):
    """The formula in float64 NumPy: loss, dx, dw, dweights."""
    x, w = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x_TD, w_DV))
    t, wt = np.asarray(targets_T), np.asarray(weights_T, np.float64)
    z = x @ w
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    ce = lse - z[np.arange(len(t)), t]
    dz = wt[:, None] * (np.exp(z - lse[:, None]) - np.eye(z.shape[1])[t])
    return np.sum(wt * ce), dz @ w.T, x.T @ dz, ce


def today(x_TD, w_DV, targets_T, weights_T):
    """The model's path today, through a real Linear (float32 kernel cast to x's
    dtype) and lm_loss's arithmetic, jitted as the train step is: loss, dx, dw, dweights."""
    head = Linear(D, V, (None, None), std=1.0, dtype=x_TD.dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(head)
    state = jax.tree.map(lambda _: w_DV.astype(jnp.float32), state)  # its one leaf: the kernel

    def loss(x_TD, state, weights_T):
        logits_TV = nnx.merge(graphdef, state)(x_TD).astype(jnp.float32)
        ce_T = optax.softmax_cross_entropy_with_integer_labels(logits_TV, targets_T)
        return jnp.sum(ce_T * weights_T)

    value, (dx, dstate, dweights) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        x_TD, state, weights_T
    )
    return value, dx, jax.tree.leaves(dstate)[0], dweights


def chunked(x_TD, w_DV, targets_T, weights_T, chunk):
    def loss(x_TD, w_DV, weights_T):
        return chunked_cross_entropy(x_TD, w_DV, targets_T, weights_T, chunk=chunk)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x_TD, w_DV, weights_T)


def assert_close(got, want, rtol, atol_fraction):
    """Each of loss, dx, dw, dweights within rtol * |want| + atol_fraction * max|want|."""
    for name, g, w in zip(("loss", "dx", "dw", "dweights"), got, want):
        g, w = np.asarray(jnp.asarray(g, jnp.float32), np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(
            g, w, rtol=rtol, atol=atol_fraction * np.abs(w).max(), err_msg=name
        )


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradients_match_float64_reference(dtype, chunk):
    """float32: to float32 rounding. bfloat16: the inputs are exact in float64, but
    a backend may round each logit to bfloat16 (2^-9 relative) before the float32
    cast, as Linear's output is bfloat16, and dx, dw come back in bfloat16 from
    bfloat16 matmuls of (softmax - onehot) itself rounded to bfloat16: a few
    bfloat16 units (2^-8 = 0.4%) of the largest entry. A wrong formula, target
    or weight is off by O(1)."""
    args = inputs(dtype)
    (value, (dx, dw, dweights)) = chunked(*args, chunk)
    assert value.dtype == jnp.float32
    assert (dx.dtype, dw.dtype, dweights.dtype) == (args[0].dtype, args[1].dtype, jnp.float32)
    rtol, atol_fraction = (1e-5, 1e-6) if dtype == "float32" else (1e-2, 2e-2)
    assert_close((value, dx, dw, dweights), reference_f64(*args), rtol, atol_fraction)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradients_match_todays_path(dtype, chunk):
    """The same arithmetic as the model's, so float32 rounding (the sums run in
    another order) in both dtypes; bfloat16 gradients up to one bfloat16 unit
    (2^-8 relative), as an f32 value on a rounding boundary may round either way,
    and this path accumulates dw over chunks in float32 and rounds it to bfloat16
    once where today's is one bfloat16 matmul."""
    args = inputs(dtype)
    value, grads = chunked(*args, chunk)
    want = today(*args)
    np.testing.assert_allclose(value, want[0], rtol=1e-6)
    rtol, atol_fraction = (1e-5, 1e-6) if dtype == "float32" else (2**-7, 2**-8)
    assert_close((value, *grads), want, rtol, atol_fraction)


def test_masked_targets_change_nothing():
    """A weight-0 token adds nothing to the loss or dw and gets dx = 0, whatever
    its target: the loss is the unmasked tokens' loss alone."""
    x_TD, w_DV, targets_T, weights_T = inputs("float32")
    masked = weights_T == 0
    assert 0 < masked.sum() < T
    other_T = jnp.where(masked, (targets_T + 7) % V, targets_T)
    value, (dx, dw, _) = chunked(x_TD, w_DV, targets_T, weights_T, 5)
    value2, (dx2, dw2, _) = chunked(x_TD, w_DV, other_T, weights_T, 5)
    np.testing.assert_array_equal(value, value2)
    np.testing.assert_array_equal(dw, dw2)
    np.testing.assert_array_equal(dx[masked], 0.0)
    np.testing.assert_array_equal(dx, dx2)
    keep = ~np.asarray(masked)
    alone = chunked_cross_entropy(x_TD[keep], w_DV, targets_T[keep], weights_T[keep], chunk=5)
    np.testing.assert_allclose(value, alone, rtol=1e-6)


def test_it_jits_with_the_chunk_static():
    args = inputs("bfloat16")
    fn = jax.jit(chunked_cross_entropy, static_argnames="chunk")
    np.testing.assert_allclose(fn(*args, chunk=5), chunked_cross_entropy(*args, chunk=5), 1e-6)
    grad = jax.jit(jax.grad(fn, argnums=(0, 1)), static_argnames="chunk")
    for got, want in zip(grad(*args, chunk=5), jax.grad(fn, argnums=(0, 1))(*args, chunk=5)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [dict(chunk=0), dict(w_DV=jnp.zeros((D + 1, V)))])
def test_bad_arguments_say_what_is_wrong(bad):
    x_TD, w_DV, targets_T, weights_T = inputs("float32")
    kwargs = dict(x_TD=x_TD, w_DV=w_DV, targets_T=targets_T, weights_T=weights_T) | bad
    with pytest.raises(ValueError, match="chunk must be|must be .T, D. and .D, V."):
        chunked_cross_entropy(**kwargs)


def test_gradient_memory_is_a_chunk_not_the_logits():
    """T=4096, V=8192: the (T, V) float32 logits are 128 MiB. Today's gradient
    holds them and their gradient (~256 MiB of temporaries); the chunked one a
    few (512, V) blocks and the (D, V) float32 dw (~24 MiB on CPU)."""
    big_T, big_D, big_V = 4096, 128, 8192
    shapes = (
        jax.ShapeDtypeStruct((big_T, big_D), jnp.float32),
        jax.ShapeDtypeStruct((big_D, big_V), jnp.float32),
        jax.ShapeDtypeStruct((big_T,), jnp.int32),
        jax.ShapeDtypeStruct((big_T,), jnp.float32),
    )

    def todays_loss(x_TD, w_DV, targets_T, weights_T):
        logits_TV = (x_TD @ w_DV).astype(jnp.float32)
        ce_T = optax.softmax_cross_entropy_with_integer_labels(logits_TV, targets_T)
        return jnp.sum(ce_T * weights_T)

    def temp_bytes(loss):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = big_T * big_V * 4
    chunked_bytes = temp_bytes(lambda *a: chunked_cross_entropy(*a, chunk=512))
    assert temp_bytes(todays_loss) > logits_bytes
    assert chunked_bytes < logits_bytes / 4
