"""Data at scale: text against `muonjax tokenize` shards, and the input pipeline's margin.

    python experiments/bench_data.py            # about 3 minutes here
    python experiments/bench_data.py --quick    # a small corpus, for the test suite

1. Tokenizing the corpus (default: the standard library's source) into shards, once.
2. Start-up and host memory of a run's data, side by side: a fresh process
   that imports muonjax, loads the data (`load_data`: the text read and
   tokenized, or the shards' manifest opened) and builds its first batch;
   wall time and peak RSS, the median of 3 alternating repeats of each. On
   the corpus, on the same corpus 10 times over (what grows with data), and
   with the BPE tokenizer (one repeat), which the text path trains and
   applies at every fresh start.
3. The input pipeline alone: batches per second of `train_batches` over the
   shards (grain, the trainer's read options) for the train-step shapes of
   experiments/device_check.py, in tokens/s, against the tokens/s the train
   step needs: the device check's (results/device_check/results.json, when
   there) and this machine's own step (its first device) for the `small`
   shape. Margin = pipeline / step; below 1 the step would wait for data.
4. Verifying shards (muonjax/train/integrity.py: every record read once, the
   sha256 and token ids checked), in this process: token bytes per second on
   the 10x corpus's shards (--quick: the small corpus's), the median of 3.

Writes results/bench_data/results.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# a fresh process: its data's start-up and peak memory. The peak is VmHWM, this
# process's own high-water mark: Linux carries ru_maxrss over from the parent across
# fork and exec, so it would report this script's memory instead.
PROBE = """
import json, pathlib, sys, time
started = time.perf_counter()
from muonjax.train import TrainConfig
from muonjax.train.data import load_data
from muonjax.train.pipeline import train_batches
config = TrainConfig(**json.loads(sys.argv[1]))
data = load_data(config, pathlib.Path(sys.argv[2]))
next(train_batches(data.train_tokens, config.seq_len, config.batch_size, config.seed))
seconds = time.perf_counter() - started
status = pathlib.Path("/proc/self/status").read_text().splitlines()
peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_kib / 1024,
                  "train_tokens": len(data.train_tokens)}))
"""

# (batch, sequence) of the train steps the pipeline must keep up with (device_check's)
SHAPES = {"small": (32, 512), "1b": (8, 2048)}


def probe(fields: dict, tmp: pathlib.Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(fields), str(tmp)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_up(data: tuple[str, ...], shards: str, repeats: int, tmp: pathlib.Path, **fields) -> dict:
    modes = {"text": {"data": list(data)}, "shards": {"data": [shards]}}
    runs = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, given in modes.items():
            runs[mode].append(probe({**given, **fields, "batch_size": 32, "seq_len": 512}, tmp))
    out = {}
    for mode, rows in runs.items():
        out[mode] = {
            "seconds": statistics.median(r["seconds"] for r in rows),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rows),
            "train_tokens": rows[0]["train_tokens"],
            "runs": rows,
        }
    out["seconds_ratio"] = out["text"]["seconds"] / out["shards"]["seconds"]
    out["rss_ratio"] = out["text"]["peak_rss_mib"] / out["shards"]["peak_rss_mib"]
    return out


def pipeline_rate(shards: str, batch: int, seq: int, batches: int) -> dict:
    from muonjax.train.pipeline import train_batches
    from muonjax.train.shards import ShardedTokens, read_manifest

    tokens = ShardedTokens(shards, "train", read_manifest(shards))
    it = train_batches(tokens, seq, batch, seed=0)
    next(it)  # threads started, first reads done
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - started
    return {"batches": batches, "seconds": seconds, "tokens_per_s": batches * batch * seq / seconds}


def local_step_rate(preset: str, batch: int, seq: int, steps: int) -> float:
    """This machine's tokens/s of `preset`'s train step at (batch, seq), on its first device."""
    import jax
    import numpy as np

    from muonjax.parallel import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.program import build

    config = TrainConfig(preset=preset, batch_size=batch, seq_len=seq)
    mesh = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    program = build(config, config.model_config(vocab_size=256), mesh)
    tokens = np.random.default_rng(0).integers(0, 256, (batch, seq + 1)).astype(np.int32)
    tokens = jax.device_put(tokens, program.batch)
    state, metrics = program.step(program.init(), tokens)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = program.step(state, tokens)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    return batch * seq / statistics.median(times)


def verify_rate(shards: str, repeats: int) -> dict:
    """Seconds to verify the shards folder whole (median of `repeats`), and its token bytes."""
    from muonjax.train.integrity import token_bytes, verify_shards
    from muonjax.train.shards import read_manifest

    manifest = read_manifest(shards)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        verify_shards(shards, manifest, range(manifest["vocab_size"]))
        times.append(time.perf_counter() - started)
    seconds, size = statistics.median(times), token_bytes(manifest)
    return {"token_bytes": size, "seconds": seconds, "mb_per_s": size / 1e6 / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus, for the test suite")
    parser.add_argument("--data", nargs="+", default=[], help="the corpus (default: the stdlib's)")
    parser.add_argument("--out", help="results folder (default: results/bench_data)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or ROOT / "results" / "bench_data")
    out.mkdir(parents=True, exist_ok=True)
    from muonjax.train import TrainConfig
    from muonjax.train.shards import write_shards

    results = {"quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        tmp = pathlib.Path(tmp)
        data = tuple(args.data)
        if args.quick and not data:  # 40 files of the standard library
            from muonjax.train.corpus import load_corpus

            (tmp / "corpus").mkdir()
            for i, text in enumerate(load_corpus().texts[:40]):
                (tmp / "corpus" / f"doc{i:02d}.py").write_text(text)
            data = (str(tmp / "corpus"),)
        started = time.perf_counter()
        manifest = write_shards(TrainConfig(data=data), tmp / "shards", log=lambda *_: None)
        results["tokenize"] = {
            "seconds": time.perf_counter() - started,
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "shard_bytes": sum(p.stat().st_size for p in (tmp / "shards").iterdir()),
            "corpus": {k: manifest["source"][k] for k in ("files", "characters")},
        }
        print(f"tokenize: {results['tokenize']}", flush=True)
        results["start_up"] = start_up(data, str(tmp / "shards"), 1 if args.quick else 3, tmp)
        s = results["start_up"]
        print(f"start-up: text {s['text']['seconds']:.2f} s {s['text']['peak_rss_mib']:.0f} MiB, "
              f"shards {s['shards']['seconds']:.2f} s {s['shards']['peak_rss_mib']:.0f} MiB",
              flush=True)  # fmt: skip
        if not args.quick:  # a BPE: the text path trains and encodes it at every fresh start
            bpe = TrainConfig(data=data, tokenizer="bpe")
            write_shards(bpe, tmp / "shards_bpe", log=lambda *_: None)
            results["start_up_bpe"] = start_up(data, str(tmp / "shards_bpe"), 1, tmp,
                                               tokenizer="bpe")  # fmt: skip
            s = results["start_up_bpe"]
            print(f"start-up, BPE: text {s['text']['seconds']:.2f} s "
                  f"{s['text']['peak_rss_mib']:.0f} MiB, shards {s['shards']['seconds']:.2f} s "
                  f"{s['shards']['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
        if not args.quick:  # the same corpus 10 times over (120 MB): what grows with the data
            from muonjax.train.corpus import load_corpus

            big = tmp / "corpus_x10"
            big.mkdir()
            for copy in range(10):
                for i, text in enumerate(load_corpus(data).texts):
                    (big / f"{copy:02d}-{i:05d}.py").write_text(text)
            write_shards(TrainConfig(data=(str(big),)), tmp / "shards_x10", log=lambda *_: None)
            results["start_up_x10"] = start_up((str(big),), str(tmp / "shards_x10"), 3, tmp)
            s = results["start_up_x10"]
            print(f"start-up x10: text {s['text']['seconds']:.2f} s "
                  f"{s['text']['peak_rss_mib']:.0f} MiB, shards {s['shards']['seconds']:.2f} s "
                  f"{s['shards']['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
        verified = tmp / ("shards" if args.quick else "shards_x10")
        results["verify"] = verify_rate(str(verified), 1 if args.quick else 3)
        v = results["verify"]
        print(f"verify: {v['token_bytes'] / 1e6:.0f} MB of tokens in {v['seconds']:.2f} s, "
              f"{v['mb_per_s']:.0f} MB/s", flush=True)  # fmt: skip
        device = ROOT / "results" / "device_check" / "results.json"
        device_steps = json.loads(device.read_text())["train_step"] if device.exists() else {}
        kind = json.loads(device.read_text())["device_kind"] if device.exists() else None
        results["pipeline"] = {}
        for name, (batch, seq) in SHAPES.items():
            if args.quick:
                batch, seq = 8, 64
            rate = pipeline_rate(str(tmp / "shards"), batch, seq, 10 if args.quick else 200)
            row = {"batch_size": batch, "seq_len": seq, **rate}
            step = device_steps.get(name, {}).get("muon", {}).get("tokens_per_s")
            if step and not args.quick:
                row["device_step_tokens_per_s"] = step
                row["device"] = kind
                row["margin_over_device_step"] = rate["tokens_per_s"] / step
            results["pipeline"][name] = row
            print(f"pipeline {name} ({batch} x {seq}): {rate['tokens_per_s']:.0f} tokens/s"
                  + (f", {kind} step {step:.0f}: margin {row['margin_over_device_step']:.1f}x"
                     if "margin_over_device_step" in row else ""), flush=True)  # fmt: skip
        batch, seq = (8, 64) if args.quick else SHAPES["small"]
        import jax

        local = local_step_rate(
            "tiny" if args.quick else "small", batch, seq, 2 if args.quick else 5
        )
        row = results["pipeline"]["small"]
        row["local_device"] = jax.devices()[0].device_kind
        row["local_step_tokens_per_s"] = local
        row["margin_over_local_step"] = row["tokens_per_s"] / local
        print(f"this machine's small step ({row['local_device']}): {local:.0f} tokens/s: margin "
              f"{row['margin_over_local_step']:.1f}x")  # fmt: skip
        shutil.rmtree(tmp / "shards")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
