"""Distributed Muon on a mesh: muonjax.muon against optax.contrib.muon, for
row-sharded kernels on 8 simulated CPU devices, under Auto and Explicit axes.

    python experiments/bench_distributed_muon.py            # 16 kernels (1024, 1024)
    python experiments/bench_distributed_muon.py --quick    # 8 kernels (128, 128), seconds

Each kernel is sharded P("d", None) over the mesh ("d",) = 8 devices, params,
gradients and the jitted update under `jax.set_mesh`. For each library and
axis type: whether the update compiles (optax.contrib.muon fails under
Explicit axes: the error's type and first line are kept); from the compiled
HLO the collective bytes sent per device (`muonjax.parallel.hlo`), the
all-gathers, and XLA's FLOPs per device against the Newton-Schulz FLOPs of all
kernels / 8 (goal <= 1.15); the bytes against one all-gather of every
kernel (n * size * 7/8 per device); the median wall time of each update, all
of them interleaved in the same run (the machine's load drifts); and
muonjax's sharded update against its unsharded one on one device. optax.contrib.muon's update rule differs from ours (no weight decay,
shape factor sqrt(max(1, A/B)), eps 1e-8): the Newton-Schulz work is the same.

Writes OUT/results.json (default results/bench_distributed_muon).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

from muonjax.parallel.cluster import simulate_cpu_devices

simulate_cpu_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import muonjax  # noqa: E402
from muonjax.parallel import hlo  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results" / "bench_distributed_muon"
DEVICES, LR = 8, 0.02
LIBRARIES = {
    "muonjax": lambda: muonjax.muon(learning_rate=LR),
    "optax": lambda: optax.contrib.muon(learning_rate=LR),
}


def kernels(count, size, seed):
    rng = np.random.default_rng(seed)
    return {f"k{i:02d}": rng.standard_normal((size, size), np.float32) for i in range(count)}


def compile_update(tx, host_p, host_g, mesh):
    """(compiled update, its arguments) with params/grads sharded P("d", None)."""
    sharding = NamedSharding(mesh, P("d", None))
    p, g = jax.device_put(host_p, sharding), jax.device_put(host_g, sharding)
    state = jax.jit(tx.init)(p)
    return jax.jit(tx.update).lower(g, state, p).compile(), (g, state, p)


def inspect(compiled, gather_bytes, ns_per_device):
    comm = hlo.collective_bytes(compiled.as_text(), DEVICES)
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    sent = sum(comm["bytes"].values())
    return {
        "collective_bytes": comm["bytes"],
        "collective_instructions": comm["instructions"],
        "bytes_per_device": sent,
        "bytes_over_one_all_gather": sent / gather_bytes,
        "all_gathers": comm["instructions"]["all-gather"],
        "all_gather_bytes": comm["bytes"]["all-gather"],
        "flops_per_device": flops,
        "flops_over_ideal": flops / ns_per_device,
    }


def time_alternating(calls, repeats):
    """Median seconds per call of each compiled update, interleaved."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # warm up
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 kernels (128, 128), 2 repeats")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    count, size, repeats = (8, 128, 2) if args.quick else (16, 1024, 10)
    host_p, host_g = kernels(count, size, 0), kernels(count, size, 1)
    gather_bytes = count * size * size * 4 * (DEVICES - 1) / DEVICES
    ns_total = muonjax.newton_schulz_flops((count, size, size))
    ns_per_device = ns_total / DEVICES

    # unsharded reference: plain arrays on one device, no mesh
    device = jax.devices()[0]
    tx = LIBRARIES["muonjax"]()
    p1, g1 = jax.device_put(host_p, device), jax.device_put(host_g, device)
    reference = jax.jit(tx.update)(g1, jax.jit(tx.init)(p1), p1)[0]

    rows, calls = [], {}
    for mode in ("Auto", "Explicit"):
        mesh = jax.make_mesh((DEVICES,), ("d",), axis_types=(getattr(AxisType, mode),))
        with jax.set_mesh(mesh):
            for lib, make in LIBRARIES.items():
                row = {"library": lib, "mode": mode}
                rows.append(row)
                try:
                    compiled, call_args = compile_update(make(), host_p, host_g, mesh)
                except Exception as e:  # noqa: BLE001 -- recorded, not fatal
                    error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    row.update(compiles=False, error=error)
                    continue
                row.update(compiles=True, **inspect(compiled, gather_bytes, ns_per_device))
                calls[lib, mode] = (compiled, call_args)
                if lib == "muonjax":
                    sharded = compiled(*call_args)[0]
                    row["max_abs_diff_vs_unsharded"] = max(
                        float(np.max(np.abs(np.asarray(sharded[k]) - np.asarray(reference[k]))))
                        for k in host_p
                    )
                    row["update_spec"] = str(sharded["k00"].sharding.spec)
    seconds = time_alternating(calls, repeats)
    for row in rows:
        key = row["library"], row["mode"]
        if key in seconds:
            row["seconds"] = seconds[key]
            row["seconds_over_muonjax"] = seconds[key] / seconds["muonjax", row["mode"]]

    print(
        f"{count} kernels ({size}, {size}) float32, P('d', None) over {DEVICES} CPU devices; "
        f"one all-gather of them = {gather_bytes / 1e6:.1f} MB/device; Newton-Schulz "
        f"{ns_total / 1e9:.2f} GFLOP in all, {ns_per_device / 1e9:.2f} / device ideal"
    )
    print(
        f"{'library':8s} {'mode':9s} {'MB/device':>10s} {'/ 1 gather':>10s} {'all-gathers':>11s} "
        f"{'GFLOP/dev':>10s} {'/ ideal':>8s} {'ms':>8s} {'/ muonjax':>9s} {'max|diff|':>10s}"
    )
    for r in rows:
        if not r["compiles"]:
            print(f"{r['library']:8s} {r['mode']:9s} does not compile: {r['error'][:90]}")
            continue
        diff = r.get("max_abs_diff_vs_unsharded")
        print(
            f"{r['library']:8s} {r['mode']:9s} {r['bytes_per_device'] / 1e6:10.2f} "
            f"{r['bytes_over_one_all_gather']:10.3f} {r['all_gathers']:11d} "
            f"{r['flops_per_device'] / 1e9:10.2f} {r['flops_over_ideal']:8.3f} "
            f"{r['seconds'] * 1e3:8.1f} {r.get('seconds_over_muonjax', float('nan')):9.2f} "
            f"{'' if diff is None else f'{diff:10.2e}'}"
        )
    print(
        "optax.contrib.muon's update rule differs (no weight decay, sqrt(max(1, A/B)) scale, "
        "eps 1e-8); its Newton-Schulz work is the same."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "devices": jax.device_count(),
        "kernels": count,
        "shape": [size, size],
        "repeats": repeats,
        "one_all_gather_bytes_per_device": gather_bytes,
        "newton_schulz_flops_total": ns_total,
        "newton_schulz_flops_per_device_ideal": ns_per_device,
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
