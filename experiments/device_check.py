"""Device check: muonjax's speed on this machine's accelerator, in one command.

    python experiments/device_check.py            # on a GPU or TPU (not yet timed at these sizes)
    python experiments/device_check.py --quick    # tiny sizes, any backend (the test suite's CPU)

Measures, on the first device, each section on its own (a failure is recorded
and the next section runs; results.json is written after each):

1. matmul: a plain (n, n) @ (n, n) product in float32 and bfloat16, the
   device's reachable rate (the ceiling the rest is held against).
2. newton_schulz: `muonjax.orthogonalize` on each of the 1.03B MoE's Muon
   leaves (stacks included) with float32 and bfloat16 compute, TFLOP/s
   (counting the FLOPs it executes, `newton_schulz_flops`) and the fraction of
   the same dtype's matmul rate; and the singular values of its output on one
   matrix (Jordan's coefficients put them in about [0.7, 1.2]). float32 runs
   at JAX's default matmul precision (TF32 on NVIDIA GPUs) and at "highest".
3. optax_contrib: `muonjax.muon` against `optax.contrib.muon` (consistent_rms
   0.2, told the stacks' axes), jitted update time on a Moonlight-like MoE's
   shapes, timed alternately.
4. dispatch: every expert dispatch (ragged_dot, blocks, tiles) at the 1B
   train step's shapes in bfloat16: forward and backward time, and each one's
   output and gradients against `blocks`.
5. attention: `causal_attention` with XLA's kernel (the logits materialized,
   as before) and cuDNN's (on a GPU), forward and backward at the 1B's shapes
   (MLA: query/key 192, value 128), and the logit statistics' own pass.
6. train_step: the jitted train step of the 1.03B MoE (bfloat16, remat dots,
   8 x 2048 tokens) with Muon and with AdamW, Muon with the other dispatches,
   both at --grad-accum 8 (64 x 2048 tokens a step), and Table 2's 822M dense
   row with AdamW: median step time, tokens/s, model TFLOP/s (muonjax's
   `flops_per_token`: 6 x active matmul parameters plus the full attention
   square, as PaLM counts it) and MFU against the measured bfloat16 matmul
   rate, and against the datasheet peak where the device is in DATASHEET.
7. profile: a JAX profiler trace of three 1B MoE Muon steps, its device ops
   summed by name: the top 15 by time in profile.txt.

Then `goals`: the issue's six figures, each taken from this run's sections
(None where a section failed).
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

# Table 2's 822M row made dense with an MLP of [H, 4H] (update_rms's old pod
# model), and a toy of the same shape for --quick
DENSE_822M = dict(d_model=2048, n_layers=16, first_k_dense=16, intermediate_size=8192,
                  n_heads=16, attention="mha", head_dim=128)  # fmt: skip
DENSE_QUICK = dict(d_model=64, n_layers=1, first_k_dense=1, intermediate_size=256, n_heads=4,
                   attention="mha", head_dim=16)  # fmt: skip

ROOT = pathlib.Path(__file__).resolve().parent.parent

# bfloat16 dense peaks from the datasheets (TFLOP/s, no sparsity), by device_kind prefix
DATASHEET = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4,
             "NVIDIA A100": 312.0, "NVIDIA B200": 2250.0}  # fmt: skip

# the ~1B-parameter config: Moonlight's widths (d_model 2048, MLA 512 / 128 / 64 / 128, experts
# of 1408) at 6 layers and 16 experts of which 4 per token, vocabulary 32768: 1.03B total, 0.51B active
ONE_B = dict(
    d_model=2048, n_layers=6, first_k_dense=1, intermediate_size=5632,
    n_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=16, experts_per_token=4, moe_intermediate_size=1408, n_shared_experts=2,
)  # fmt: skip
BF16 = dict(dtype="bfloat16", remat="dots")
# (key, optimizer, --moe-dispatch): the auto dispatch with both optimizers, Muon with the others
RUNS_1B = [("muon", "muon", None), ("adamw", "adamw", None),
           ("muon_blocks", "muon", "blocks"), ("muon_tiles", "muon", "tiles")]  # fmt: skip
BOTH, ADAMW = RUNS_1B[:2], RUNS_1B[1:2]
DENSE = dict(n_layers=1, first_k_dense=1)  # --quick: one dense layer compiles fastest

SIZES = {  # full / quick
    "matmul_n": (8192, 256),
    "ns_model": (("small", ONE_B), ("tiny", {})),  # the Muon leaves of this preset + --model
    "sv_shape": ((1024, 4096), (64, 256)),
    "moe": (
        dict(layers=4, experts=64, d_model=2048, d_expert=1408),
        dict(layers=2, experts=4, d_model=64, d_expert=32),
    ),  # fmt: skip
    "dispatch": (  # the 1B step's: 8 x 2048 tokens
        dict(tokens=16384, d=2048, f=1408, experts=16, k=4),
        dict(tokens=64, d=32, f=16, experts=4, k=2),
    ),  # fmt: skip
    "attention": (  # batch, length, heads, query/key and value head dims
        dict(batch=8, length=2048, heads=16, qk=192, v=128),
        dict(batch=2, length=64, heads=4, qk=24, v=16),
    ),  # fmt: skip
    "train": (  # preset, --model, batch, sequence, vocabulary, TrainConfig fields, runs
        {
            "1b": ("small", ONE_B, 8, 2048, 32768, BF16, RUNS_1B),
            "1b_accum8": ("small", ONE_B, 64, 2048, 32768, {**BF16, "grad_accum": 8}, BOTH),
            "dense_822m": ("small", DENSE_822M, 8, 2048, 32768, BF16, ADAMW),
        },
        {
            "1b": ("tiny", {}, 8, 32, 512, BF16, RUNS_1B),
            "1b_accum8": ("tiny", DENSE, 16, 32, 512, {**BF16, "grad_accum": 2}, BOTH),
            "dense_822m": ("tiny", DENSE_QUICK, 8, 32, 512, BF16, ADAMW),
        },
    ),  # fmt: skip
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


def muon_shapes(quick: bool) -> list[tuple[int, ...]]:
    """The distinct shapes of the model's Muon leaves (layer and expert stacks whole)."""
    from flax import nnx

    from muonjax.models import abstract_model
    from muonjax.train import TrainConfig
    from muonjax.train.costs import muon_leaves

    preset, model = size("ns_model", quick)
    config = TrainConfig(preset=preset, model=model).model_config()
    params = nnx.state(abstract_model(config), nnx.Param)
    return sorted({tuple(leaf.shape) for _, leaf in muon_leaves(params)})


def newton_schulz(quick: bool, rates: dict) -> dict:
    import muonjax

    repeats, out = size("repeats", quick), {"shapes": []}
    for shape in muon_shapes(quick):
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        row = {"shape": list(shape)}
        for dtype, precision in (("float32", None), ("bfloat16", None), ("float32", "highest")):
            with jax.default_matmul_precision(precision):  # None: JAX's default (TF32 on GPUs)
                fn = jax.jit(lambda x, d=dtype: muonjax.orthogonalize(x, compute_dtype=d))
                seconds = bench_optimizer.median_time(fn, x, repeats=repeats)
            gflop = muonjax.newton_schulz_flops(shape, compute_dtype=dtype) / 1e9
            tflops = gflop / 1e3 / seconds
            row[dtype if precision is None else f"{dtype}_{precision}"] = {
                "seconds": seconds,
                "gflop": gflop,
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


def rel_diff(a, b) -> float:
    """||a - b|| / ||b||, in float32 (bfloat16 arrays included)."""
    return float(
        jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32))
    )


def dispatch(quick: bool) -> dict:
    """Every expert dispatch's forward and backward at the train step's shapes
    in bfloat16, each against `blocks` (outputs and gradients)."""
    from muonjax.models.dispatch import routed_experts

    s = size("dispatch", quick)
    keys = jax.random.split(jax.random.key(3), 6)
    bf16 = lambda key, shape, scale: (scale * jax.random.normal(key, shape)).astype(jnp.bfloat16)  # noqa: E731
    x = bf16(keys[0], (s["tokens"], s["d"]), 1.0)
    experts = jax.random.randint(keys[1], (s["tokens"], s["k"]), 0, s["experts"])
    weights = jax.nn.softmax(jax.random.normal(keys[2], (s["tokens"], s["k"])), -1)
    gate = bf16(keys[3], (s["experts"], s["d"], s["f"]), s["d"] ** -0.5)
    up = bf16(keys[4], (s["experts"], s["d"], s["f"]), s["d"] ** -0.5)
    down = bf16(keys[5], (s["experts"], s["f"], s["d"]), s["f"] ** -0.5)

    def loss_and_grads(method):
        def loss(x, gate, up, down):
            y = routed_experts(x, experts, weights, gate, up, down, method=method)
            y = y.astype(jnp.float32)
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))

    methods = ("blocks", "ragged_dot", "tiles")
    fns = {m: loss_and_grads(m) for m in methods}
    results = {m: fn(x, gate, up, down) for m, fn in fns.items()}
    (_, y_b), g_b = results["blocks"]
    out = {**s, "dtype": "bfloat16", "seconds": {}, "output_rel_diff": {}, "grad_rel_diff": {}}
    for m, fn in fns.items():
        out["seconds"][m] = bench_optimizer.median_time(
            fn, x, gate, up, down, repeats=size("repeats", quick)
        )
        (_, y), g = results[m]
        out["output_rel_diff"][m] = rel_diff(y, y_b)
        out["grad_rel_diff"][m] = {
            n: rel_diff(a, b) for n, a, b in zip(("x", "gate", "up", "down"), g, g_b)
        }
    return out


def attention(quick: bool) -> dict:
    """causal_attention by XLA's kernel and cuDNN's (a GPU only), forward and
    backward, and the logit statistics' pass, at the 1B's attention shapes."""
    from muonjax.models.attention import causal_attention, logit_stats

    s = size("attention", quick)
    keys = jax.random.split(jax.random.key(4), 3)
    shape = (s["batch"], s["length"], s["heads"])
    q, k = (jax.random.normal(key, (*shape, s["qk"]), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (*shape, s["v"]), jnp.bfloat16)
    scale = s["qk"] ** -0.5
    repeats, out = size("repeats", quick), {**s, "dtype": "bfloat16", "seconds": {}}
    outputs = {}
    for kernel in ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",):
        loss = lambda q, k, v, kernel=kernel: jnp.sum(  # noqa: E731
            causal_attention(q, k, v, scale, kernel).astype(jnp.float32) ** 2
        )
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        outputs[kernel] = fn(q, k, v)
        out["seconds"][kernel] = bench_optimizer.median_time(fn, q, k, v, repeats=repeats)
    stats = jax.jit(lambda q, k: logit_stats(q, k, scale))
    out["seconds"]["logit_stats"] = bench_optimizer.median_time(stats, q, k, repeats=repeats)
    if "cudnn" in outputs:
        (lx, gx), (lc, gc) = outputs["xla"], outputs["cudnn"]
        out["cudnn_vs_xla"] = {
            "loss_rel_diff": float(abs(lc - lx) / abs(lx)),
            "grad_rel_diff": [rel_diff(a, b) for a, b in zip(gc, gx)],
            "xla_over_cudnn": out["seconds"]["xla"] / out["seconds"]["cudnn"],
        }
    return out


def _build(preset, model, batch, seq, vocab, fields, optimizer, dispatch):
    """The program of one train step on the first device, its state and a batch."""
    from muonjax.parallel import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.program import build

    config = TrainConfig(
        preset=preset, model=model, batch_size=batch, seq_len=seq, optimizer=optimizer,
        moe_dispatch=dispatch, **fields,
    )  # fmt: skip
    model_config = config.model_config(vocab_size=vocab)
    mesh = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    program = build(config, model_config, mesh)
    tokens = np.random.default_rng(0).integers(0, model_config.vocab_size, (batch, seq + 1))
    return (
        model_config,
        program,
        program.init(),
        jax.device_put(tokens.astype(np.int32), program.batch),
    )


def _time_steps(program, state, tokens, repeats: int):
    """The first step's time (compilation), the median of `repeats` more, the last metrics."""
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        state, metrics = program.step(state, tokens)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[1:]), metrics


def train_step(quick: bool, rates: dict, peak: float | None) -> dict:
    from muonjax.models import flops_per_token, param_counts

    measured = rates.get("bfloat16", {}).get("tflop_per_s")
    out = {}
    for name, (preset, model, batch, seq, vocab, fields, runs) in size("train", quick).items():
        row = {"preset": preset, "model": model, "batch_size": batch, "seq_len": seq, **fields}
        for key, optimizer, dispatch in runs:
            built = _build(preset, model, batch, seq, vocab, fields, optimizer, dispatch)
            model_config, program, state, tokens = built
            first_s, seconds, metrics = _time_steps(program, state, tokens, size("repeats", quick))
            tflops = flops_per_token(model_config, seq) * batch * seq / seconds / 1e12
            row["parameters"] = param_counts(model_config)
            row[key] = {
                "seconds": seconds,
                "first_step_s": first_s,
                "tokens_per_s": batch * seq / seconds,
                "model_tflop_per_s": tflops,
                "mfu_vs_measured_bf16_matmul": tflops / measured if measured else None,
                "mfu_vs_datasheet": tflops / peak if peak else None,
                "loss": float(metrics["loss"]),
            }
            del state, built
        if "muon" in row:
            row["muon_over_adamw"] = row["muon"]["seconds"] / row["adamw"]["seconds"]
        out[name] = row
    return out


def profile(quick: bool, out_dir: pathlib.Path) -> dict:
    """Three Muon steps of the 1B MoE under the JAX profiler; its Perfetto trace's
    complete events summed by name (device ops where the trace has a device
    track, else everything): the top 15 by time, also written to profile.txt."""
    import gzip
    import tempfile

    preset, model, batch, seq, vocab, fields, _ = size("train", quick)["1b"]
    _, program, state, tokens = _build(preset, model, batch, seq, vocab, fields, "muon", None)
    state, metrics = program.step(state, tokens)  # compiled outside the trace
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(3):
                state, metrics = program.step(state, tokens)
            jax.block_until_ready(metrics)
        trace = json.loads(
            gzip.decompress(next(pathlib.Path(tmp).rglob("*.trace.json.gz")).read_bytes())
        )
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    device = {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name}
    on_device = [e for e in events if e["pid"] in device] or events
    total: dict[str, float] = {}
    for e in on_device:
        total[e["name"]] = total.get(e["name"], 0.0) + e["dur"] / 1e3 / 3  # ms per step
    top = sorted(total.items(), key=lambda kv: -kv[1])[:15]
    lines = [f"{ms:10.3f} ms/step  {name[:110]}" for name, ms in top]
    (out_dir / "profile.txt").write_text(
        f"top 15 of {len(total)} ops by time per step ({'device' if device else 'host'} "
        f"events), 1B MoE Muon step\n" + "\n".join(lines) + "\n"
    )
    return {"device_events": bool(device), "ops": len(total), "top_ms_per_step": dict(top)}


def goals(results: dict) -> dict:
    """The issue's six figures, each from this run (None where its section failed)."""

    def get(*keys):
        value = results
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    shapes = get("newton_schulz", "shapes") or []
    ns = [row["bfloat16"]["of_matmul"] for row in shapes if row["bfloat16"]["of_matmul"]]
    muon_a, adamw_a = (
        get("train_step", "1b_accum8", "muon", "seconds"),
        get("train_step", "1b_accum8", "adamw", "seconds"),
    )
    return {
        "moe_1b_adamw_mfu": get("train_step", "1b", "adamw", "mfu_vs_measured_bf16_matmul"),
        "moe_1b_muon_mfu": get("train_step", "1b", "muon", "mfu_vs_measured_bf16_matmul"),
        "moe_1b_muon_accum8_over_adamw_accum8": muon_a / adamw_a if muon_a and adamw_a else None,
        "dense_822m_adamw_mfu": get(
            "train_step", "dense_822m", "adamw", "mfu_vs_measured_bf16_matmul"
        ),
        "ns_bf16_over_matmul_min": min(ns) if ns else None,
        "muon_over_optax_contrib": get("optax_contrib", "ratio_median"),
    }


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
    kind = results["device_kind"]
    peak = next((tf for name, tf in DATASHEET.items() if kind.startswith(name)), None)
    results["datasheet_bf16_tflop_per_s"] = peak
    sections = [
        ("matmul", lambda: matmul(args.quick)),
        ("newton_schulz", lambda: newton_schulz(args.quick, results.get("matmul", {}))),
        ("optax_contrib", lambda: optax_contrib(args.quick)),
        ("dispatch", lambda: dispatch(args.quick)),
        ("attention", lambda: attention(args.quick)),
        ("train_step", lambda: train_step(args.quick, results.get("matmul", {}), peak)),
        ("profile", lambda: profile(args.quick, out)),
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
    results["goals"] = goals(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"goals: {json.dumps(results['goals'])}\nwrote {out / 'results.json'}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
