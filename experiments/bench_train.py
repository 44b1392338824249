"""Throughput of `muonjax train`, Muon against AdamW, and the cost of checkpoints.

    python experiments/bench_train.py

1. tokens/s of tiny and small with --optimizer muon and adamw, trained one
   after the other in this one process (median over the logged intervals,
   compilation excluded), and the Muon/AdamW step-time ratio.
2. Checkpoint cost: the same tiny run saving every 5 steps and never; the
   extra time per save as a fraction of a step.

Writes results/bench_train/results.json.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import jax
from flax import nnx

import muonjax
import muonjax.train
from muonjax.models import abstract_model, flops_per_token, preset
from muonjax.train import TrainConfig

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results" / "bench_train"
SETUPS = {
    "tiny": dict(steps=120, batch_size=32, seq_len=128, log_every=10),
    "small": dict(steps=30, batch_size=8, seq_len=256, log_every=5),
}


def tokens_per_s(tmp, name, **kw):
    config = TrainConfig(out=str(pathlib.Path(tmp) / name), eval_every=10**6, progress=False, **kw)
    return muonjax.train.run(config, log=lambda *_: None).tokens_per_s


def step_flops(preset_name, batch_size, seq_len):
    """(Newton-Schulz FLOPs of the Muon group, forward+backward FLOPs) per step."""
    config = preset(preset_name)
    params = nnx.state(abstract_model(config), nnx.Param)
    labels = jax.tree.leaves(muonjax.moonlight_labels(params))
    ns = sum(
        muonjax.newton_schulz_flops(p.shape)
        for p, label in zip(jax.tree.leaves(params), labels)
        if label == "muon"
    )
    return ns, flops_per_token(config, seq_len) * batch_size * seq_len


def main():
    results = {"throughput": {}, "checkpoint": {}}
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"{'preset':8s} {'muon tok/s':>11s} {'adamw tok/s':>12s} {'muon/adamw step time':>21s}"
        )
        for name, setup in SETUPS.items():
            tps = {
                opt: tokens_per_s(
                    tmp,
                    f"{name}-{opt}",
                    preset=name,
                    optimizer=opt,
                    checkpoint_every=10**6,
                    **setup,
                )
                for opt in ("muon", "adamw")
            }
            ratio = tps["adamw"] / tps["muon"]
            ns, model = step_flops(name, setup["batch_size"], setup["seq_len"])
            results["throughput"][name] = {
                **setup,
                "tokens_per_s": tps,
                "muon_over_adamw_step_time": ratio,
                "newton_schulz_gflop_per_step": ns / 1e9,
                "forward_backward_gflop_per_step": model / 1e9,
            }
            print(
                f"{name:8s} {tps['muon']:11.0f} {tps['adamw']:12.0f} {ratio:21.2f}   "
                f"(Newton-Schulz {ns / 1e9:.1f} GFLOP/step, forward+backward {model / 1e9:.1f} GFLOP/step)"
            )
        setup, every = SETUPS["tiny"], 5
        never = tokens_per_s(tmp, "ckpt-never", checkpoint_every=10**6, **setup)
        often = tokens_per_s(tmp, "ckpt-often", checkpoint_every=every, **setup)
        tokens = setup["batch_size"] * setup["seq_len"]
        step_never, step_often = tokens / never, tokens / often
        lost = (step_often - step_never) * every
        results["checkpoint"] = {
            "preset": "tiny",
            "every": every,
            "step_seconds": step_never,
            "step_seconds_with_saves": step_often,
            "seconds_lost_per_save": lost,
            "per_save_over_step_time": lost / step_never,
        }
        print(
            f"\ncheckpoint every {every} steps (tiny): step {step_never * 1e3:.1f} ms without saves, "
            f"{step_often * 1e3:.1f} ms with; {lost * 1e3:.1f} ms lost per save = {lost / step_never:.2f} steps"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
