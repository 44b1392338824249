"""Language-model cross-entropy that never holds the whole (tokens, vocab) logits.

The LM head's logits are computed a chunk of tokens at a time, in the forward
pass and again in the backward pass, so the peak memory is a (chunk, vocab)
block and the (D, V) gradient rather than (T, V) float32 logits and their
gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(x_TD, w_DV, targets_T, weights_T, *, chunk: int = 4096) -> jax.Array:
    """() float32: sum_t weights_T[t] * (logsumexp(logits_t) - logits_t[targets_T[t]]),
    with logits_TV = x_TD @ w_DV computed `chunk` tokens at a time.

    A chunk's logits are muonjax.models.layers.Linear's, `x @ w` in the dtype
    of x and w (pass both in the compute dtype), then cast to float32: the same
    arithmetic as `optax.softmax_cross_entropy_with_integer_labels(
    lm_head(x).astype(float32), targets)` weighted and summed. Targets must lie
    in [0, V), as `split_targets` gives them; a masked target has weight 0.
    The gradient recomputes each chunk's logits and accumulates dw in float32;
    weights_T gets its true gradient (each token's cross-entropy), targets none.

    Chunk i holds tokens i, i + n, i + 2n, ... (n chunks), so tokens sharded
    in contiguous blocks stay sharded within every chunk. T not a multiple of
    `chunk` is padded with weight-0 tokens; chunk >= T is one chunk.
    """
    if x_TD.ndim != 2 or w_DV.ndim != 2 or x_TD.shape[1] != w_DV.shape[0]:
        raise ValueError(f"x_TD {x_TD.shape} and w_DV {w_DV.shape} must be (T, D) and (D, V)")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    T = x_TD.shape[0]
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:
        x_TD = jnp.pad(x_TD, ((0, pad), (0, 0)))
        targets_T = jnp.pad(targets_T, (0, pad))
        weights_T = jnp.pad(weights_T, (0, pad))

    def chunks(a):  # (N * C, ...) -> (N, C, ...), chunk i = rows i, i + N, ...
        return a.reshape(C, N, *a.shape[1:]).swapaxes(0, 1)

    return _chunked_ce(chunks(x_TD), w_DV, chunks(targets_T), chunks(weights_T))


def _logits(x_CD, w_DV):
    """Linear's product in the inputs' dtype, then float32, as the model casts it."""
    return (x_CD @ w_DV).astype(jnp.float32)


def _target_logit(logits_CV, targets_C):
    return jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]


def _forward(x_NCD, w_DV, targets_NC, weights_NC):
    """The loss and the residuals: x, w, targets, weights and logsumexp_NC float32."""

    def one_chunk(args):
        x_CD, targets_C = args
        logits_CV = _logits(x_CD, w_DV)
        return jax.nn.logsumexp(logits_CV, axis=-1), _target_logit(logits_CV, targets_C)

    lse_NC, target_NC = jax.lax.map(one_chunk, (x_NCD, targets_NC))
    loss = jnp.sum((lse_NC - target_NC) * weights_NC)
    return loss, (x_NCD, w_DV, targets_NC, weights_NC, lse_NC)


def _backward(residuals, g):
    """dloss/dlogits_CV = g * weight * (softmax - onehot(target)), chunk by chunk."""
    x_NCD, w_DV, targets_NC, weights_NC, lse_NC = residuals
    V = w_DV.shape[1]

    def one_chunk(dw_DV, args):
        x_CD, targets_C, weights_C, lse_C = args
        logits_CV = _logits(x_CD, w_DV)
        onehot_CV = targets_C[:, None] == jnp.arange(V, dtype=targets_C.dtype)
        p_CV = jnp.exp(logits_CV - lse_C[:, None])
        # Cast to the matmul dtype, as the transpose of Linear's float32 cast does.
        dlogits_CV = ((p_CV - onehot_CV) * (g * weights_C)[:, None]).astype(x_CD.dtype)
        dx_CD = jnp.dot(dlogits_CV, w_DV.T, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.dot(x_CD.T, dlogits_CV, preferred_element_type=jnp.float32)
        dweights_C = g * (lse_C - _target_logit(logits_CV, targets_C))
        return dw_DV, (dx_CD.astype(x_CD.dtype), dweights_C.astype(weights_C.dtype))

    dw_DV = jnp.zeros(w_DV.shape, jnp.float32)
    xs = (x_NCD, targets_NC, weights_NC, lse_NC)
    dw_DV, (dx_NCD, dweights_NC) = jax.lax.scan(one_chunk, dw_DV, xs)
    if not jnp.issubdtype(weights_NC.dtype, jnp.floating):
        dweights_NC = None  # integer weights take no gradient
    return dx_NCD, dw_DV.astype(w_DV.dtype), None, dweights_NC


@jax.custom_vjp
def _chunked_ce(x_NCD, w_DV, targets_NC, weights_NC):
    return _forward(x_NCD, w_DV, targets_NC, weights_NC)[0]


_chunked_ce.defvjp(_forward, _backward)
