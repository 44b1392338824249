"""Speed and XLA-counted FLOPs of the routed experts by dispatch method, on this machine.

    python experiments/bench_dispatch.py [--quick] [--repeats 3]

Forward+backward (gradients w.r.t. x and the three expert stacks) of
`routed_experts` alone, float32, for each method ("blocks", "tiles",
"ragged_dot") at a small shape (the small preset's MoE) and a medium one,
with uniform routing and with 90% of the tokens' first choice on expert 0.
Beside each time: the compiled step's FLOPs (XLA cost analysis) over the
routed FLOPs, 3 x 2 x 3 x T*k*D*F ("blocks" loops, so XLA cannot count it).

Writes results/bench_dispatch/results.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
from bench_model import median_seconds

from muonjax.models.dispatch import routed_experts, tile_rows

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results" / "bench_dispatch"
METHODS = ("blocks", "tiles", "ragged_dot")
SHAPES = {  # name: (T, D, F, E, k)
    "small: T=2048 D=256 F=256 E=16 k=2": (2048, 256, 256, 16, 2),
    "medium: T=4096 D=512 F=384 E=16 k=4": (4096, 512, 384, 16, 4),
}
QUICK_SHAPES = {"quick: T=128 D=32 F=48 E=8 k=2": (128, 32, 48, 8, 2)}


def problem(T, D, F, E, K, skewed):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (T, D))
    experts = jnp.argsort(jax.random.uniform(keys[1], (T, E)), axis=-1)[:, :K].astype(jnp.int32)
    if skewed:  # 90% of the first choices on expert 0 (its other choices stay distinct)
        hot = jnp.arange(T) < int(0.9 * T)
        first = experts[:, :1]
        experts = jnp.where(hot[:, None] & (experts == 0), first, experts)
        experts = experts.at[:, 0].set(jnp.where(hot, 0, experts[:, 0]))
    weights = jax.random.uniform(keys[2], (T, K))
    w = tuple(
        0.05 * jax.random.normal(k, s) for k, s in zip(keys[3:], [(E, D, F), (E, D, F), (E, F, D)])
    )
    return x, experts, weights, w


def measure(shape, skewed, method, repeats):
    T, D, F, E, K = shape
    x, experts, weights, w = problem(T, D, F, E, K, skewed)
    cot = jax.random.normal(jax.random.key(1), x.shape)  # not ones: XLA would fold them

    def loss(w, x, experts, weights):
        return jnp.sum(routed_experts(x, experts, weights, *w, method=method) * cot)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))  # the value: forward counted whole
    args = (w, x, experts, weights)  # the routing as arguments, not constants XLA folds
    flops = step.lower(*args).compile().cost_analysis()["flops"]
    return {
        "seconds": median_seconds(step, *args, repeats=repeats),
        "xla_flops_over_routed": flops / (3 * 2 * 3 * T * K * D * F),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="results folder (default: results/bench_dispatch[/scratch])")
    args = parser.parse_args()
    folder = pathlib.Path(args.out) if args.out else RESULTS / ("scratch" if args.quick else "")
    shapes, repeats = (QUICK_SHAPES, 1) if args.quick else (SHAPES, args.repeats)
    out = {"backend": jax.default_backend(), "devices": str(jax.devices()[0]), "runs": {}}
    print(f"routed experts, forward+backward, float32, on {out['devices']}")
    for name, shape in shapes.items():
        print(f"  {name} (tiles of {tile_rows(shape[0] * shape[4], shape[3])} rows)")
        for skewed in (False, True):
            routing = "90% on expert 0" if skewed else "uniform"
            for method in METHODS:
                r = measure(shape, skewed, method, repeats)
                out["runs"][f"{name}, {routing}, {method}"] = r
                print(
                    f"    {routing:16s} {method:10s} {r['seconds'] * 1e3:9.1f} ms   "
                    f"XLA FLOPs / routed {r['xla_flops_over_routed']:.2f}"
                )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
