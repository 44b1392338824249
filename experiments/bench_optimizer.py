"""Newton-Schulz efficiency and Muon step time against optax.contrib.muon.

    python experiments/bench_optimizer.py [--repeats 7]

1. FLOP/s achieved by `muonjax.orthogonalize` (counting the FLOPs it executes)
   over the FLOP/s of a plain matmul of the same size, (m, n) @ (n, m), timed
   in the same run: for one 1024 x 4096 matrix and a 16 x 1024 x 704 stack.
2. Step time of `muonjax.muon` over `optax.contrib.muon(consistent_rms=0.2)`,
   both jitted, on the parameter shapes of a small MoE (per-layer 2-D attention
   matrices, (L, E, D, F) expert stacks, told to optax by dimension numbers),
   for three expert widths. The two are timed alternately; the ratio is the
   median over repeats.

Writes results/bench_optimizer/results.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import muonjax

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results" / "bench_optimizer"


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    return statistics.median(timed(fn, *args) for _ in range(repeats))


def newton_schulz_efficiency(shape, repeats):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    wide = x if rows <= cols else jnp.swapaxes(x, -1, -2)
    wide_t = jnp.swapaxes(wide, -1, -2) + 0  # materialized (n, m) operand
    matmul = jax.jit(jnp.matmul)
    ortho = jax.jit(muonjax.orthogonalize)
    t_mm, t_ns = [], []
    jax.block_until_ready((matmul(wide, wide_t), ortho(x)))
    for _ in range(repeats):  # alternate, so both see the same machine state
        t_mm.append(timed(matmul, wide, wide_t))
        t_ns.append(timed(ortho, x))
    count = 1
    for b in batch:
        count *= b
    mm_flops = 2 * m * m * n * count
    ns_flops = muonjax.newton_schulz_flops(shape)
    mm_rate = mm_flops / statistics.median(t_mm)
    ns_rate = ns_flops / statistics.median(t_ns)
    return {
        "shape": list(shape),
        "ns_seconds": statistics.median(t_ns),
        "ns_gflops": ns_flops / 1e9,
        "ns_gflop_per_s": ns_rate / 1e9,
        "matmul_gflop_per_s": mm_rate / 1e9,
        "efficiency": ns_rate / mm_rate,
        "standard_form_gflops": count * 5 * (4 * m * m * n + 2 * m**3) / 1e9,
    }


def small_moe_shapes(layers=4, experts=16, d_model=512, d_expert=256):
    """Per-layer 2-D attention matrices plus (L, E, D, F) expert stacks."""
    shapes = {f"layer{i}/attn/{w}": (d_model, d_model) for i in range(layers) for w in "qkvo"}
    shapes["experts/gate"] = (layers, experts, d_model, d_expert)
    shapes["experts/up"] = (layers, experts, d_model, d_expert)
    shapes["experts/down"] = (layers, experts, d_expert, d_model)
    return shapes


# Expert width F for D=512 in the proportions of real MoEs: Moonlight's
# 1408/2048, a middle one, and DeepSeek-V3's 2048/7168.
EXPERT_WIDTHS = {
    "F=352 (Moonlight's F/D=0.69)": 352,
    "F=256 (F/D=0.5)": 256,
    "F=144 (DeepSeek-V3's F/D=0.29)": 144,
}


def step_time_ratio(shapes, repeats):
    key = jax.random.key(1)
    params = {
        k: jax.random.normal(jax.random.fold_in(key, i), s)
        for i, (k, s) in enumerate(shapes.items())
    }
    grads = {k: 0.01 * v for k, v in params.items()}
    dims = optax.contrib.MuonDimensionNumbers
    dim_numbers = {
        k: dims(reduction_axis=v.ndim - 2, output_axis=v.ndim - 1) for k, v in params.items()
    }
    txs = {
        "muonjax": muonjax.muon(1e-3, weight_decay=0.1),
        "optax": optax.contrib.muon(
            1e-3, weight_decay=0.1, consistent_rms=0.2, muon_weight_dimension_numbers=dim_numbers
        ),
    }
    steps = {k: jax.jit(tx.update) for k, tx in txs.items()}
    states = {k: tx.init(params) for k, tx in txs.items()}
    for k in txs:
        jax.block_until_ready(steps[k](grads, states[k], params))
    times = {k: [] for k in txs}
    for _ in range(repeats):
        for k in txs:
            times[k].append(timed(steps[k], grads, states[k], params))
    ratios = [a / b for a, b in zip(times["muonjax"], times["optax"])]
    return {
        "muonjax_seconds": statistics.median(times["muonjax"]),
        "optax_seconds": statistics.median(times["optax"]),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "param_count": sum(v.size for v in params.values()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    results = {"devices": str(jax.devices()[0].device_kind), "newton_schulz": [], "step": {}}
    print("Newton-Schulz FLOP/s over plain matmul FLOP/s (same run)")
    for shape in [(1024, 4096), (16, 1024, 704)]:
        r = newton_schulz_efficiency(shape, args.repeats)
        results["newton_schulz"].append(r)
        print(
            f"  {shape!s:16s} NS {r['ns_gflop_per_s']:6.1f} GFLOP/s  matmul "
            f"{r['matmul_gflop_per_s']:6.1f} GFLOP/s  efficiency {r['efficiency']:.2f}  "
            f"time {r['ns_seconds'] * 1e3:7.1f} ms ({r['ns_gflops']:.1f} GFLOP; "
            f"standard form {r['standard_form_gflops']:.1f})"
        )
    print(
        "Muon step on a small MoE (4 layers, D=512, 16 experts of width F), muonjax / optax.contrib"
    )
    for label, d_expert in EXPERT_WIDTHS.items():
        shapes = small_moe_shapes(d_expert=d_expert)
        r = step_time_ratio(shapes, args.repeats)
        results["step"][label] = {"shapes": {k: list(v) for k, v in shapes.items()}, **r}
        print(
            f"  {label:34s} muonjax {r['muonjax_seconds'] * 1e3:7.1f} ms  optax.contrib "
            f"{r['optax_seconds'] * 1e3:7.1f} ms  ratio (median of {args.repeats}) {r['ratio_median']:.2f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
