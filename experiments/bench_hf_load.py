"""Loading a Hugging Face checkpoint: peak host memory against the checkpoint's size.

    python experiments/bench_hf_load.py            # about 2 minutes here
    python experiments/bench_hf_load.py --quick    # a tiny checkpoint, for the test suite

A random MoE of Moonlight's structure (~230M parameters; --quick: ~1M) is
written by `to_hf` as Moonlight ships its weights: bfloat16, in several
safetensors shards (here 128 MB each, Moonlight's are ~4 GB) with an index.
Then, each in a fresh process, the peak RSS (VmHWM) of:

- baseline: importing muonjax and starting JAX's CPU backend;
- from_hf: muonjax's loader, onto one device; it reads each device's block of
  each parameter from the memory-mapped files as it places it, and unmaps them
  after each parameter;
- read whole first: every shard read into host memory at once
  (safetensors' load_file), then from_hf, as a loader that gathers the state
  dict before converting it would.

On a CPU the device's memory is host memory, so the loaded model itself
(float32: twice the bfloat16 checkpoint) is part of every peak but the
baseline's. Two measures of what a loader costs beyond it: peak - RSS at the
end (what it held at its peak and let go), and peak - baseline - model (an
upper bound: it also counts what JAX's compiler and allocator keep).
Median of 3 alternating repeats (1 with --quick). Writes
results/bench_hf_load/results.json.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import sweep
from common import arguments, write_results

PROBE = """
import json, pathlib, sys, time
import jax
from muonjax.models.hf import from_hf
jax.devices()
mode, directory = sys.argv[1], pathlib.Path(sys.argv[2])
started = time.perf_counter()
held = None
if mode == "read_whole_first":
    from safetensors.numpy import load_file
    held = {}
    for file in sorted(directory.glob("*.safetensors")):
        held |= load_file(str(file))
if mode != "baseline":
    model = from_hf(directory)
    jax.block_until_ready(jax.tree.leaves(model))
seconds = time.perf_counter() - started
del held
status = pathlib.Path("/proc/self/status").read_text().splitlines()
kib = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith("Vm")}
print(json.dumps({"seconds": seconds, "peak_rss_mib": kib["VmHWM"] / 1024,
                  "rss_mib": kib["VmRSS"] / 1024}))
"""
MODES = ("baseline", "from_hf", "read_whole_first")

MODEL = dict(  # ~230M parameters, Moonlight's structure (MLA, 1 dense layer, shared experts)
    vocab_size=32768, d_model=1024, n_layers=4, first_k_dense=1, intermediate_size=2816,
    n_heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=32, experts_per_token=4, moe_intermediate_size=512, n_shared_experts=2,
    routed_scaling_factor=2.446, rms_norm_eps=1e-5,
)  # fmt: skip
QUICK_MODEL = dict(vocab_size=512, rms_norm_eps=1e-5)


def probe(mode: str, directory: pathlib.Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(directory)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(config, shard_bytes: int, repeats: int) -> dict:
    """One checkpoint of `config`, written and then loaded by each mode."""
    import jax
    from flax import nnx

    from muonjax.models import Transformer, param_counts
    from muonjax.models.hf import to_hf

    with tempfile.TemporaryDirectory(prefix="muonjax-bench-hf-") as tmp:
        directory = pathlib.Path(tmp) / "checkpoint"
        started = time.perf_counter()
        model = Transformer(config, rngs=nnx.Rngs(0))
        to_hf(model, directory, dtype="bfloat16", max_shard_bytes=shard_bytes)
        write_s = time.perf_counter() - started
        model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
        del model
        sizes = [f.stat().st_size for f in directory.glob("*.safetensors")]
        runs = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:
                runs[mode].append(probe(mode, directory))
    mib = 1 << 20
    result = {
        "n_layers": config.n_layers,
        "parameters": param_counts(config)["total"],
        "checkpoint": {
            "dtype": "bfloat16",
            "mib": sum(sizes) / mib,
            "shards": len(sizes),
            "largest_shard_mib": max(sizes) / mib,
            "write_seconds": write_s,
        },
        "model_float32_mib": model_bytes / mib,
    }
    base = statistics.median(r["peak_rss_mib"] for r in runs["baseline"])
    for mode in MODES:
        rows = runs[mode]
        peak = statistics.median(r["peak_rss_mib"] for r in rows)
        row = {"peak_rss_mib": peak, "seconds": statistics.median(r["seconds"] for r in rows)}
        if mode != "baseline":
            # what the loader held at its peak beyond what stays when it is done
            row["transient_mib"] = statistics.median(r["peak_rss_mib"] - r["rss_mib"] for r in rows)
            row["peak_above_baseline_mib"] = peak - base
            row["beyond_model_mib"] = peak - base - model_bytes / mib
        result[mode] = row
    return result


def main(argv=None) -> int:
    args = arguments("bench_hf_load", __doc__, argv)
    from muonjax.models import ModelConfig

    base = QUICK_MODEL if args.quick else MODEL
    layers = (2,) if args.quick else (4, 8)
    shard_bytes = (1 << 18) if args.quick else (128 << 20)
    repeats = 1 if args.quick else 3
    results = {"quick": args.quick, "model": base, "repeats": repeats, "sizes": []}
    for n in layers:
        config = ModelConfig(**{**base, "n_layers": n})
        r = measure(config, shard_bytes, repeats)
        results["sizes"].append(r)
        c = r["checkpoint"]
        print(
            f"{n} layers: checkpoint {c['mib']:.0f} MiB bf16 in {c['shards']} shards (largest "
            f"{c['largest_shard_mib']:.0f} MiB); model {r['model_float32_mib']:.0f} MiB float32; "
            f"baseline {r['baseline']['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        for mode in MODES[1:]:
            m = r[mode]
            print(
                f"  {mode:18s} peak {m['peak_rss_mib']:6.0f} MiB: transient (peak - end) "
                f"{m['transient_mib']:5.0f} MiB, beyond baseline + model "
                f"{m['beyond_model_mib']:5.0f} MiB, {m['seconds']:.1f} s",
                flush=True,
            )
    print(f"wrote {write_results(args.out, results)}")
    return 0


if __name__ == "__main__":
    sweep.start_jax()
    sys.exit(main())
