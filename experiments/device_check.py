"""Device check: muonjax's speed on this machine's accelerator, in one command.

    python experiments/device_check.py            # on a GPU or TPU: ~5 minutes
    python experiments/device_check.py --quick    # tiny sizes, any backend (the test suite's CPU)

Measures, on the first device, each section on its own (a failure is recorded
and the next section runs):

1. matmul: a plain (n, n) @ (n, n) product in float32 and bfloat16, the
   device's reachable rate (the ceiling the rest is held against).
2. newton_schulz: `muonjax.orthogonalize` with float32 and bfloat16 compute,
   TFLOP/s (counting the FLOPs it executes, `newton_schulz_flops`) and the
   fraction of the same dtype's matmul rate; and the singular values of its
   output on one matrix (Jordan's coefficients put them in about [0.7, 1.2]).
   float32 runs at JAX's default matmul precision (TF32 on NVIDIA GPUs, bf16
   passes on TPUs) and at "highest" (true float32).
3. optax_contrib: `muonjax.muon` against `optax.contrib.muon` (consistent_rms
   0.2, told the stacks' axes), jitted update time on a Moonlight-like MoE's
   shapes, timed alternately.
4. dispatch: the MoE's `ragged_dot` expert dispatch (the accelerator default)
   against the `blocks` one: forward outputs and gradients on random routing.
5. train_step: the jitted train step of `small` (float32) and of a 1.03B-
   parameter MoE (bfloat16 activations, MLA, 16 experts, remat), with Muon and
   with AdamW: median step time, tokens/s, model TFLOP/s (muonjax's FLOP
   count: 6 x active matmul parameters per token plus attention) and MFU
   against the measured bfloat16 matmul rate; the Muon / AdamW step ratio; and
   Muon's step with the other expert dispatch than auto's (blocks on an
   accelerator, ragged_dot on the CPU).

Writes results/device_check/results.json after every section.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_optimizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent

# the ~1B-parameter config: Moonlight's widths (d_model 2048, MLA 512 / 128 / 64 / 128, experts
# of 1408) at 6 layers and 16 experts of which 4 per token, vocabulary 32768: 1.03B total, 0.51B active
ONE_B = dict(
    d_model=2048, n_layers=6, first_k_dense=1, intermediate_size=5632,
    n_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=16, experts_per_token=4, moe_intermediate_size=1408, n_shared_experts=2,
)  # fmt: skip
BF16 = dict(dtype="bfloat16", remat=True)
DENSE = dict(n_layers=1, first_k_dense=1)  # --quick: one dense layer compiles fastest

SIZES = {  # full / quick
    "matmul_n": (8192, 256),
    "ns_shapes": ([(4096, 4096), (2048, 8192), (16, 1024, 1408)], [(4, 64, 96)]),
    "sv_shape": ((1024, 4096), (64, 256)),
    "moe": (
        dict(layers=4, experts=64, d_model=2048, d_expert=1408),
        dict(layers=2, experts=4, d_model=64, d_expert=32),
    ),  # fmt: skip
    "dispatch": (
        dict(tokens=8192, d=1024, f=512, experts=16, k=4),
        dict(tokens=64, d=32, f=16, experts=4, k=2),
    ),  # fmt: skip
    "train": (  # preset, --model, batch, sequence, vocabulary, TrainConfig fields
        {"small": ("small", {}, 32, 512, 256, {}), "1b": ("small", ONE_B, 8, 2048, 32768, BF16)},
        {"1b": ("tiny", DENSE, 8, 32, 512, BF16)},  # one program pair: the suite's time
    ),
    "repeats": (10, 3),
}


def size(name: str, quick: bool):
    return SIZES[name][1 if quick else 0]


def matmul(quick: bool) -> dict:
    n, repeats = size("matmul_n", quick), size("repeats", quick)
    out = {"n": n}
    for dtype in ("float32", "bfloat16"):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        seconds = bench_optimizer.median_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
        out[dtype] = {"seconds": seconds, "tflop_per_s": 2 * n**3 / seconds / 1e12}
    return out


def newton_schulz(quick: bool, rates: dict) -> dict:
    import muonjax

    repeats, out = size("repeats", quick), {"shapes": []}
    for shape in size("ns_shapes", quick):
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        row = {"shape": list(shape), "gflop": muonjax.newton_schulz_flops(shape) / 1e9}
        for dtype, precision in (("float32", None), ("bfloat16", None), ("float32", "highest")):
            with jax.default_matmul_precision(precision):  # None: JAX's default (TF32 on GPUs)
                fn = jax.jit(lambda x, d=dtype: muonjax.orthogonalize(x, compute_dtype=d))
                seconds = bench_optimizer.median_time(fn, x, repeats=repeats)
            tflops = row["gflop"] / 1e3 / seconds
            row[dtype if precision is None else f"{dtype}_{precision}"] = {
                "seconds": seconds,
                "tflop_per_s": tflops,
                "of_matmul": tflops / rates[dtype]["tflop_per_s"] if dtype in rates else None,
            }
        out["shapes"].append(row)
    x = jax.random.normal(jax.random.key(2), size("sv_shape", quick), jnp.float32)
    for dtype in ("float32", "bfloat16"):
        o = muonjax.orthogonalize(x, compute_dtype=dtype).astype(jnp.float32)
        s = np.linalg.svd(np.asarray(o, np.float64), compute_uv=False)
        out[f"singular_values_{dtype}"] = {"min": float(s.min()), "max": float(s.max())}
    return out


def optax_contrib(quick: bool) -> dict:
    shapes = bench_optimizer.small_moe_shapes(**size("moe", quick))
    r = bench_optimizer.step_time_ratio(shapes, size("repeats", quick))
    return {"shapes": {k: list(v) for k, v in shapes.items()}, **r}


def dispatch(quick: bool) -> dict:
    from muonjax.models.dispatch import routed_experts

    s = size("dispatch", quick)
    keys = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(keys[0], (s["tokens"], s["d"]), jnp.float32)
    experts = jax.random.randint(keys[1], (s["tokens"], s["k"]), 0, s["experts"])
    weights = jax.nn.softmax(jax.random.normal(keys[2], (s["tokens"], s["k"])), -1)
    scale = s["d"] ** -0.5
    gate = scale * jax.random.normal(keys[3], (s["experts"], s["d"], s["f"]))
    up = scale * jax.random.normal(keys[4], (s["experts"], s["d"], s["f"]))
    down = s["f"] ** -0.5 * jax.random.normal(keys[5], (s["experts"], s["f"], s["d"]))

    def loss_and_grads(method):
        def loss(x, gate, up, down):
            y = routed_experts(x, experts, weights, gate, up, down, method=method)
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))

    fns = {m: loss_and_grads(m) for m in ("ragged_dot", "blocks")}
    results = {m: fn(x, gate, up, down) for m, fn in fns.items()}
    (_, y_r), g_r = results["ragged_dot"]
    (_, y_b), g_b = results["blocks"]
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    times = {
        m: bench_optimizer.median_time(fn, x, gate, up, down, repeats=size("repeats", quick))
        for m, fn in fns.items()
    }
    return {
        **s,
        "output_rel_diff": rel(y_r, y_b),
        "grad_rel_diff": {n: rel(a, b) for n, a, b in zip(("x", "gate", "up", "down"), g_r, g_b)},
        "seconds": times,
    }


def train_step(quick: bool, rates: dict) -> dict:
    from muonjax.models import flops_per_token, param_counts
    from muonjax.parallel import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.program import build

    mesh = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    peak = rates.get("bfloat16", {}).get("tflop_per_s")
    out = {}
    for name, (preset, model, batch, seq, vocab, fields) in size("train", quick).items():
        row = {"preset": preset, "model": model, "batch_size": batch, "seq_len": seq, **fields}
        # the default expert dispatch (auto), then Muon with the other one (MoE models)
        other = "ragged_dot" if jax.default_backend() == "cpu" else "blocks"
        runs = [("muon", "muon", None), ("adamw", "adamw", None)]
        if TrainConfig(preset=preset, model=model).model_config().n_moe_layers:
            runs.append((f"muon_{other}", "muon", other))
        for key, optimizer, dispatch in runs:
            config = TrainConfig(
                preset=preset, model=model, batch_size=batch, seq_len=seq, optimizer=optimizer,
                moe_dispatch=dispatch, **fields,
            )  # fmt: skip
            model_config = config.model_config(vocab_size=vocab)
            program = build(config, model_config, mesh)
            tokens = np.random.default_rng(0).integers(0, model_config.vocab_size, (batch, seq + 1))
            tokens = jax.device_put(tokens.astype(np.int32), program.batch)
            state = program.init()
            started = time.perf_counter()
            state, metrics = program.step(state, tokens)
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - started
            times = []
            for _ in range(size("repeats", quick)):
                started = time.perf_counter()
                state, metrics = program.step(state, tokens)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times)
            flops = flops_per_token(model_config, seq) * batch * seq
            row["parameters"] = param_counts(model_config)
            row[key] = {
                "seconds": seconds,
                "first_step_s": compile_s,
                "tokens_per_s": batch * seq / seconds,
                "model_tflop_per_s": flops / seconds / 1e12,
                "mfu_vs_measured_bf16_matmul": flops / seconds / 1e12 / peak if peak else None,
                "loss": float(metrics["loss"]),
            }
            del state
        row["muon_over_adamw"] = row["muon"]["seconds"] / row["adamw"]["seconds"]
        if f"muon_{other}" in row:
            row[f"{other}_over_auto"] = row[f"muon_{other}"]["seconds"] / row["muon"]["seconds"]
        out[name] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--out", help="results folder (default: results/device_check)")
    parser.add_argument(
        "--sections", help="a comma-separated subset to run (matmul always runs: the ceiling)"
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or ROOT / "results" / "device_check")
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    results = {
        "quick": args.quick,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "versions": {m.__name__: m.__version__ for m in (jax, np)},
        "errors": {},
    }
    try:
        import flax
        import optax

        results["versions"].update(flax=flax.__version__, optax=optax.__version__)
    except ImportError:
        pass
    print(f"{results['backend']}: {results['device_kind']} x {results['device_count']}", flush=True)
    sections = [
        ("matmul", lambda: matmul(args.quick)),
        ("newton_schulz", lambda: newton_schulz(args.quick, results.get("matmul", {}))),
        ("optax_contrib", lambda: optax_contrib(args.quick)),
        ("dispatch", lambda: dispatch(args.quick)),
        ("train_step", lambda: train_step(args.quick, results.get("matmul", {}))),
    ]
    if args.sections:
        wanted = {"matmul", *args.sections.split(",")}
        sections = [(name, fn) for name, fn in sections if name in wanted]
    for name, fn in sections:
        started = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # recorded; the other sections still run
            results["errors"][name] = "".join(traceback.format_exception_only(e)).strip()
            traceback.print_exc()
        results.setdefault("section_s", {})[name] = time.perf_counter() - started
        print(f"{name} ({results['section_s'][name]:.0f} s): "
              f"{json.dumps(results.get(name, results['errors'].get(name)))[:1500]}",
              flush=True)  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
