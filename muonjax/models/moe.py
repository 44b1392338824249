"""DeepSeek-V3 mixture of experts: sigmoid router, selection-only balancing bias,
normalized top-k weights, shared experts, dropless dispatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from muonjax.models.config import ModelConfig
from muonjax.models.dispatch import routed_experts
from muonjax.models.layers import MLP, param


class RouterBias(nnx.Variable):
    """Per-expert bias added to the scores for top-k selection only: not a
    Param, so no optimizer touches it; `balance_router_bias` updates it."""


class MoEAux(NamedTuple):
    load_E: jax.Array  # fraction of the T*k assignments each expert received
    balance_loss: jax.Array  # sequence-wise auxiliary loss, already times its coefficient


class Router(nnx.Module):
    """Sigmoid scores s = sigmoid(x W); top-k of s + bias picks the experts,
    their weights are s (normalized over the k, times routed_scaling_factor)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.kernel = param(
            rngs, (config.d_model, config.n_routed_experts), ("embed", None), config.init_std
        )
        self.bias = RouterBias(
            jnp.zeros((config.n_routed_experts,), jnp.float32),
            out_sharding=(None,),
            eager_sharding=False,
        )
        self.config = config

    def __call__(self, x_TD):
        c = self.config
        scores_TE = jax.nn.sigmoid(x_TD.astype(jnp.float32) @ self.kernel[...])
        _, experts_TK = jax.lax.top_k(scores_TE + self.bias[...], c.experts_per_token)
        weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
        if c.norm_topk_prob:
            weights_TK = weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)
        return scores_TE, experts_TK, weights_TK * c.routed_scaling_factor


def balance_loss(scores_BLE, experts_BLK, n_experts: int):
    """DeepSeek-V3 Eq. 17-20, averaged over sequences: sum_i f_i P_i with
    f_i = E / (k L) * #(tokens choosing i), P_i = mean_t s_it / sum_j s_jt."""
    _, L, k = experts_BLK.shape
    counts_BE = jnp.sum(jax.nn.one_hot(experts_BLK, n_experts, dtype=jnp.float32), axis=(1, 2))
    f_BE = counts_BE * n_experts / (k * L)
    p_BE = jnp.mean(scores_BLE / jnp.sum(scores_BLE, axis=-1, keepdims=True), axis=1)
    return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        E, D, F = c.n_routed_experts, c.d_model, c.moe_intermediate_size
        self.router = Router(c, rngs=rngs)
        self.experts = RoutedExperts(E, D, F, std=c.init_std, method=c.moe_dispatch, rngs=rngs)
        self.shared = (
            MLP(D, c.n_shared_experts * F, std=c.init_std, dtype=c.dtype, rngs=rngs)
            if c.n_shared_experts
            else None
        )
        self.config = c

    def __call__(self, x_BLD):
        c = self.config
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        scores_TE, experts_TK, weights_TK = self.router(x_TD)
        y_TD = self.experts(x_TD.astype(c.dtype), experts_TK, weights_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        load_E = jnp.bincount(experts_TK.reshape(-1), length=c.n_routed_experts) / experts_TK.size
        aux_loss = jnp.zeros((), jnp.float32)
        if c.aux_loss_coef:
            aux_loss = c.aux_loss_coef * balance_loss(
                scores_TE.reshape(B, L, -1), experts_TK.reshape(B, L, -1), c.n_routed_experts
            )
        return y_TD.reshape(B, L, D).astype(x_BLD.dtype), MoEAux(load_E, aux_loss)


# (x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD, *, method) -> y_TD:
# how RoutedExperts computes its experts (see `routed_experts`)
ExpertDispatch = Callable[..., jax.Array]


class RoutedExperts(nnx.Module):
    """E SwiGLU experts stored as stacks (E, D, F), (E, D, F), (E, F, D).

    `dispatch` computes them, by default on this device (`routed_experts`);
    muonjax.parallel hands in an expert-parallel one (`with_kernels`).
    It is static (part of the graph, not of the state), so it must be hashable.
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        hidden: int,
        *,
        std: float,
        method: str,
        rngs: nnx.Rngs,
        dispatch: ExpertDispatch = routed_experts,
    ):
        self.method = method  # a DISPATCH_METHODS name (see routed_experts)
        self.dispatch = dispatch
        self.gate = param(rngs, (n_experts, d_model, hidden), ("experts", "embed", "mlp"), std)
        self.up = param(rngs, (n_experts, d_model, hidden), ("experts", "embed", "mlp"), std)
        self.down = param(rngs, (n_experts, hidden, d_model), ("experts", "mlp", "embed"), std)

    def __call__(self, x_TD, experts_TK, weights_TK):
        dtype = x_TD.dtype
        weights = (
            self.gate[...].astype(dtype),
            self.up[...].astype(dtype),
            self.down[...].astype(dtype),
        )
        return self.dispatch(x_TD, experts_TK, weights_TK, *weights, method=self.method)


def balance_router_bias(bias_E, load_E, rate: float = 1e-3):
    """Auxiliary-loss-free balancing (DeepSeek-V3 Sec. 2.1.2), outside the gradient:
    b += rate * (sign(e) - mean(sign(e))) with e = mean load - load, so
    overloaded experts are picked less next step and underloaded ones more."""
    sign_E = jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)
    return bias_E + rate * (sign_E - jnp.mean(sign_E, axis=-1, keepdims=True))
