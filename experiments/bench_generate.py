"""Generation with and without the KV cache, and what MLA's cache costs.

    python experiments/bench_generate.py             # `small`, 4 prompts x 64 tokens, 64 new
    python experiments/bench_generate.py --quick     # `tiny`, toy sizes, for the test suite

1. Tokens/s of greedy `muonjax.models.generate` on `small` (vocab 256,
   float32, one CPU device): with the cache (prefill once, then one token per
   row per step) and without it (the training forward pass over the whole
   sequence so far at every step), on the same prompts, the two timed
   alternately; median of --repeats runs after a first run that compiles. The
   compile time is that first run's time less the median (the recomputation
   compiles one program per sequence length).
2. Cache bytes per token per layer, from the shapes of the cache
   `muonjax.models.transformer.init_cache` allocates (built with
   jax.eval_shape: nothing is allocated, Moonlight's parameters never exist):
   MLA's latent + shared rotary key (kv_lora_rank + qk_rope_head_dim values)
   against an MHA cache of the same heads, n_heads x (K + V) values with
   K = qk_nope_head_dim + qk_rope_head_dim for keys and V = v_head_dim for
   values (Moonlight: 16 x (192 + 128)); in the config's dtype (small:
   float32, Moonlight: bfloat16); and for Moonlight the whole model's cache for
   one 4096-token context.

Writes OUT/results.json (default results/bench_generate).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import common
import sweep

NAME = "bench_generate"
CONTEXT = 4096  # tokens of Moonlight context for the whole-model cache size
SIZES = {  # preset, batch, prompt length, new tokens, repeats
    False: dict(preset="small", batch=4, prompt_len=64, new_tokens=64, repeats=5),
    True: dict(preset="tiny", batch=2, prompt_len=8, new_tokens=4, repeats=1),
}


def throughput(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Median seconds, tokens/s and compile seconds of greedy generation, with and without the cache."""
    import jax
    from flax import nnx

    from muonjax.models import Transformer, generate
    from muonjax.models import preset as model_preset

    config = model_preset(preset).replace(vocab_size=256, dtype="float32")
    model = Transformer(config, rngs=nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, 256).tolist()
    modes = {"cached": True, "recomputed": False}

    def run(use_cache):
        start = time.perf_counter()
        tokens = generate(model, prompts, max_new_tokens=new_tokens, use_cache=use_cache)
        return time.perf_counter() - start, tokens

    first = {mode: run(use_cache) for mode, use_cache in modes.items()}
    times = {mode: [] for mode in modes}
    for _ in range(repeats):  # alternate, so both see the same machine state
        for mode, use_cache in modes.items():
            times[mode].append(run(use_cache)[0])
    result = {"preset": preset, "config": dataclasses.asdict(config), "batch": batch,
              "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}  # fmt: skip
    for mode in modes:
        seconds = statistics.median(times[mode])
        result[mode] = {
            "seconds": seconds,
            "tokens_per_s": batch * new_tokens / seconds,
            "compile_s": max(first[mode][0] - seconds, 0.0),
            "seconds_all": times[mode],
        }
    result["speedup"] = result["recomputed"]["seconds"] / result["cached"]["seconds"]
    result["same_tokens"] = first["cached"][1] == first["recomputed"][1]
    return result


def cache_bytes(preset: str, context: int | None = None) -> dict:
    """Cache values and bytes per token per layer, MLA (as allocated) against
    MHA of the same heads; with `context`, the whole model's cache for one sequence."""
    import math

    import jax
    import numpy as np

    from muonjax.models import preset as model_preset
    from muonjax.models.transformer import init_cache

    c = model_preset(preset)
    slots = context or 16
    shapes = jax.eval_shape(lambda: init_cache(c, batch=1, max_len=slots))
    arrays = {f"{stack}.{field}": leaf for stack in ("dense", "moe")
              if getattr(shapes, stack) is not None
              for field, leaf in getattr(shapes, stack)._asdict().items()}  # fmt: skip
    per_token_layer = c.n_layers * slots  # every array is (layers, batch 1, slots, ...)
    values = sum(math.prod(a.shape) for a in arrays.values()) // per_token_layer
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays.values())
    itemsize = np.dtype(c.dtype).itemsize  # an MHA cache would be in the same dtype
    k, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    mha_values = c.n_heads * (k + v)
    result = {
        "dtype": c.dtype,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "cache_shapes": {name: list(a.shape) for name, a in arrays.items()},
        "mla_values_per_token_layer": values,
        "mla_bytes_per_token_layer": total // per_token_layer,
        "mha_head_dims": {"keys": k, "values": v},
        "mha_values_per_token_layer": mha_values,
        "mha_bytes_per_token_layer": mha_values * itemsize,
        "mha_over_mla": mha_values * itemsize / (total // per_token_layer),
    }
    if context:
        result |= {"context": context, "mla_model_bytes": total,
                   "mha_model_bytes": mha_values * itemsize * c.n_layers * context}  # fmt: skip
    return result


def table(results: dict) -> str:
    t = results["throughput"]
    lines = [f"greedy generation, {t['preset']}: {t['batch']} prompts x {t['prompt_len']} tokens, "
             f"{t['new_tokens']} new, median of {t['repeats']}",
             "  mode        tokens/s   seconds   compile s"]  # fmt: skip
    for mode in ("cached", "recomputed"):
        r = t[mode]
        lines.append(
            f"  {mode:10s} {r['tokens_per_s']:9.1f} {r['seconds']:9.3f} {r['compile_s']:11.1f}"
        )
    lines.append(f"  cache speedup {t['speedup']:.1f}x; same tokens: {t['same_tokens']}")
    lines.append("cache per token per layer: MLA (latent + rotary key) vs MHA (H x (K + V))")
    for name, r in results["cache_bytes"].items():
        dims = r["mha_head_dims"]
        lines.append(
            f"  {name:18s} {r['dtype']:9s} MLA {r['mla_values_per_token_layer']:4d} values "
            f"{r['mla_bytes_per_token_layer']:6d} B   MHA {r['n_heads']} x ({dims['keys']} + "
            f"{dims['values']}) = {r['mha_values_per_token_layer']:5d} values "
            f"{r['mha_bytes_per_token_layer']:6d} B   {r['mha_over_mla']:.1f}x"
        )
        if "context" in r:
            lines.append(
                f"  {name}, {r['n_layers']} layers, {r['context']} tokens: MLA "
                f"{r['mla_model_bytes'] / 2**20:.1f} MiB, MHA {r['mha_model_bytes'] / 2**20:.1f} MiB"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, for the test suite")
    parser.add_argument("--repeats", type=int, help="timed runs per mode (default 5, --quick 1)")
    parser.add_argument("--out", help="results folder (default: results/bench_generate[/scratch])")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(common.ROOT / "results" / NAME / ("scratch" if args.quick else ""))
    import jax

    started = time.perf_counter()
    sizes = dict(SIZES[args.quick])
    if args.repeats:
        sizes["repeats"] = args.repeats
    results = {
        "quick": args.quick,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "throughput": throughput(**sizes),
        "cache_bytes": {
            "small": cache_bytes("small"),
            "moonlight-16b-a3b": cache_bytes("moonlight-16b-a3b", context=CONTEXT),
        },
    }
    results["wall_time_s"] = time.perf_counter() - started
    print(table(results))
    print(f"wrote {common.write_results(args.out, results)}")
    return 0


if __name__ == "__main__":
    sweep.start_jax()
    sys.exit(main())
