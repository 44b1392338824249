"""Forward+backward throughput and compile time of the MoE transformer on this CPU.

    python experiments/bench_model.py [--preset small] [--batch 8] [--seq-len 256]

1. Tokens/s of a jitted forward+backward of `--preset`, and model FLOP/s over
   the FLOP/s of a plain matmul measured in the same run (MFU against this
   machine's own ceiling). Model FLOPs = 3 x forward matmul FLOPs: 2 x active
   matmul parameters per token (the k routed experts, not all of them) plus
   the attention scores and mixing, 2 x L x H x (qk + v head dims) per token.
2. Where the time goes: forward+backward of each part on the same tokens.
3. The routed experts alone by dispatch method ("blocks", "tiles", "ragged_dot").
4. Compile time of a Muon train step for tiny and small, and for small at 2x
   and 4x the depth (scan keeps it flat in depth).

Writes results/bench_model/results.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import muonjax
from muonjax.models import Transformer, flops_per_token, preset
from muonjax.models.attention import attention
from muonjax.models.dispatch import routed_experts
from muonjax.models.moe import MoE

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results" / "bench_model"


def median_seconds(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loss_fn(model, tokens):
    logits, aux = model(tokens[:, :-1])
    return (
        optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        + aux.balance_loss
    )


def matmul_ceiling(repeats):
    """FLOP/s of a plain float32 matmul of the size the model's big matmuls have."""
    a = jax.random.normal(jax.random.key(0), (2048, 1024))
    b = jax.random.normal(jax.random.key(1), (1024, 1024))
    t = median_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2 * 2048 * 1024 * 1024 / t


def throughput(config, batch, seq_len, repeats):
    model = Transformer(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, config.vocab_size)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd_bwd(state, tokens):
        return jax.grad(lambda s: loss_fn(nnx.merge(graphdef, s), tokens))(state)

    seconds = median_seconds(fwd_bwd, state, tokens, repeats=repeats)
    tokens_per_step = batch * seq_len
    flops = flops_per_token(config, seq_len) * tokens_per_step
    return {
        "seconds_per_step": seconds,
        "tokens_per_s": tokens_per_step / seconds,
        "model_flop_per_s": flops / seconds,
    }


def breakdown(config, batch, seq_len, repeats):
    """Forward+backward seconds of each part, on (batch, seq_len, d_model) activations."""
    rngs = nnx.Rngs(0)
    c = config
    x = jax.random.normal(jax.random.key(1), (batch, seq_len, c.d_model))
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    T, K = batch * seq_len, c.experts_per_token

    def timed_grad(module, f):
        graphdef, state = nnx.split(module)
        g = jax.jit(jax.grad(lambda s, x: jnp.sum(f(nnx.merge(graphdef, s), x)), argnums=(0, 1)))
        return median_seconds(g, state, x, repeats=repeats)

    moe = MoE(c, rngs=rngs)
    _, experts_TK, weights_TK = moe.router(x.reshape(T, -1))
    e = moe.experts
    grouped = jax.jit(
        jax.grad(
            lambda w, x: jnp.sum(routed_experts(x, experts_TK, weights_TK, *w)), argnums=(0, 1)
        )
    )
    dense_equivalent = jax.jit(
        jax.grad(
            lambda w, x: jnp.sum((jax.nn.silu(x @ w[0]) * (x @ w[1])) @ w[2]),
            argnums=(0, 1),
        )
    )
    # the same FLOPs as the routed experts with no routing at all: T*k tokens
    # through one expert-sized SwiGLU
    xk = jnp.tile(x.reshape(T, -1), (K, 1))
    w0 = (e.gate[...][0], e.up[...][0], e.down[...][0])
    n_layers, n_moe = c.n_layers, c.n_moe_layers
    parts = {
        "attention (per layer)": timed_grad(
            attention(c, rngs=rngs), lambda m, x: m(x, positions)[0]
        ),
        "moe layer (per layer)": timed_grad(moe, lambda m, x: m(x)[0]),
        "routed experts incl. dispatch": median_seconds(
            grouped, (e.gate[...], e.up[...], e.down[...]), x.reshape(T, -1), repeats=repeats
        ),
        "routed experts, matmuls only": median_seconds(dense_equivalent, w0, xk, repeats=repeats),
    }
    parts["per step: attention"] = parts["attention (per layer)"] * n_layers
    parts["per step: moe layers"] = parts["moe layer (per layer)"] * n_moe
    parts["per step: dispatch overhead"] = (
        parts["routed experts incl. dispatch"] - parts["routed experts, matmuls only"]
    ) * n_moe
    return parts


def _routed_sum(w, x, experts, weights, method):
    return jnp.sum(routed_experts(x, experts, weights, *w, method=method))


def dispatch_methods(repeats):
    """Forward+backward of the routed experts alone, by dispatch method: on the
    small preset's MoE shape and on one with Moonlight's 64 experts, 6 active."""
    out = {}
    for name, (T, D, F, E, K) in {
        "small: T=2048 D=256 F=256 E=16 k=2": (2048, 256, 256, 16, 2),
        "moonlight-like: T=1024 D=256 F=176 E=64 k=6": (1024, 256, 176, 64, 6),
    }.items():
        keys = jax.random.split(jax.random.key(0), 6)
        x = jax.random.normal(keys[0], (T, D))
        choose = functools.partial(jax.random.choice, a=E, shape=(K,), replace=False)
        experts = jax.vmap(lambda k, choose=choose: choose(k))(jax.random.split(keys[1], T))
        weights = jax.random.uniform(keys[2], (T, K))
        w = tuple(
            0.05 * jax.random.normal(k, s)
            for k, s in zip(keys[3:], [(E, D, F), (E, D, F), (E, F, D)])
        )
        for method in ("blocks", "tiles", "ragged_dot"):
            loss = functools.partial(_routed_sum, experts=experts, weights=weights, method=method)
            g = jax.jit(jax.grad(loss, argnums=(0, 1)))
            out[f"{name}, {method}"] = median_seconds(g, w, x, repeats=repeats)
    return out


def compile_seconds(config, batch, seq_len):
    model = Transformer(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, muonjax.moonlight(1e-3), wrt=nnx.Param)
    tokens = jnp.zeros((batch, seq_len + 1), jnp.int32)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads)
        return loss

    start = time.perf_counter()
    train_step.lower(model, optimizer, tokens).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = preset(args.preset)

    ceiling = matmul_ceiling(args.repeats)
    r = throughput(config, args.batch, args.seq_len, args.repeats)
    mfu = r["model_flop_per_s"] / ceiling
    print(f"{args.preset}: batch {args.batch} x seq {args.seq_len}, forward+backward")
    print(
        f"  {r['tokens_per_s']:.0f} tokens/s, {r['seconds_per_step'] * 1e3:.0f} ms/step, "
        f"model {r['model_flop_per_s'] / 1e9:.1f} GFLOP/s, matmul ceiling {ceiling / 1e9:.1f} GFLOP/s, "
        f"MFU {mfu:.2f}"
    )
    parts = breakdown(config, args.batch, args.seq_len, args.repeats)
    print("  where the time goes (forward+backward, ms):")
    for name, seconds in parts.items():
        print(f"    {name:34s} {seconds * 1e3:8.1f}")
    dispatch = dispatch_methods(args.repeats)
    print("  routed experts by dispatch method (forward+backward, ms):")
    for name, seconds in dispatch.items():
        print(f"    {name:60s} {seconds * 1e3:8.1f}")
    compiles = {}
    print("  compile time of a Muon train step:")
    for name, cfg in [
        ("tiny", preset("tiny")),
        ("small", preset("small")),
        ("small x2 depth", preset("small").replace(n_layers=8)),
        ("small x4 depth", preset("small").replace(n_layers=16)),
    ]:
        compiles[name] = compile_seconds(cfg, 2, 64)
        print(f"    {name:16s} {compiles[name]:6.1f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "matmul_flop_per_s": ceiling,
        "mfu": mfu,
        **r,
        "breakdown_seconds": parts,
        "dispatch_seconds": dispatch,
        "compile_seconds": compiles,
        "flops_per_token": flops_per_token(config, args.seq_len),
        "devices": jax.device_count(),
    }
    (RESULTS / "results.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
