"""Distributed Muon against ZeRO-1 AdamW: communication, optimizer memory and
Newton-Schulz work per device (from `muonjax inspect`), and measured step time.

    python experiments/bench_parallel.py [--skip-moonlight]

1. `muonjax inspect --json` for small and moonlight-16b-a3b on the meshes of
   MESHES (simulated CPU devices; compiled from shapes, nothing allocated),
   with each optimizer: collective bytes per device per step (Muon / AdamW),
   optimizer-state bytes per device (Muon / AdamW), and Newton-Schulz FLOPs
   per device (Distributed Muon by ownership, padding included) against the
   ideal, the whole model's Newton-Schulz / devices, and against the paper's
   scheme, in which every data rank orthogonalizes every matrix (the whole
   model's Newton-Schulz per device); the optimizer update's FLOPs per device
   (XLA's count) also as a fraction of the forward+backward FLOPs per device.
2. Step time of `muonjax train --preset small` on 8 simulated CPU devices
   (mesh data=8, ZeRO-1), Muon over AdamW, the two runs one after the other.

Writes results/bench_parallel/results.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results" / "bench_parallel"
SEQ_LEN = {"small": 1024, "moonlight-16b-a3b": 4096}
MESHES = ("data=8", "data=64", "data=8,expert=8", "data=16,expert=16")


def inspect(preset, optimizer, mesh):
    out = subprocess.run(
        [sys.executable, "-m", "muonjax", "inspect", "--preset", preset, "--optimizer", optimizer,
         "--mesh", mesh, "--seq-len", str(SEQ_LEN[preset]), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_time(optimizer, steps=12):
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "muonjax", "train", "--preset", "small", "--optimizer", optimizer,
             "--cpu-devices", "8", "--mesh", "data=8", "--steps", str(steps), "--batch-size", "16",
             "--seq-len", "256", "--log-every", "2", "--eval-every", "1000", "--checkpoint-every", "1000",
             "--no-progress", "--out", f"{tmp}/run"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-moonlight", action="store_true", help="only the small preset")
    args = parser.parse_args()
    presets = ["small"] + ([] if args.skip_moonlight else ["moonlight-16b-a3b"])
    rows = []
    print(
        f"{'preset':18s} {'mesh':17s} {'comm Muon/AdamW':>16s} {'opt state Muon/AdamW':>21s} "
        f"{'NS GFLOP/device':>16s} {'NS / ideal':>11s} {'paper (redundant)':>18s} "
        f"{'update / fwd+bwd':>17s}"
    )
    for preset in presets:
        for mesh in MESHES:
            muon, adamw = inspect(preset, "muon", mesh), inspect(preset, "adamw", mesh)
            comm = lambda r: sum(r["collective_bytes"].values())
            whole = muon["newton_schulz_flops_whole_model"]
            row = {
                "preset": preset,
                "mesh": mesh,
                "seq_len": SEQ_LEN[preset],
                "comm_ratio": comm(muon) / comm(adamw),
                "opt_state_ratio": muon["opt_state_bytes"] / adamw["opt_state_bytes"],
                "newton_schulz_per_device": muon["newton_schulz_flops_per_device"],
                "newton_schulz_over_ideal": muon["newton_schulz_flops_per_device"]
                / (whole / muon["devices"]),
                "paper_newton_schulz_per_device": whole,
                "optimizer_flops_per_device": muon["optimizer_flops"],
                "update_over_model_flops": muon["optimizer_flops"] / muon["model_flops"],
                "muon": muon,
                "adamw": adamw,
            }
            rows.append(row)
            print(
                f"{preset:18s} {mesh:17s} {row['comm_ratio']:16.3f} {row['opt_state_ratio']:21.3f} "
                f"{row['newton_schulz_per_device'] / 1e9:16.1f} {row['newton_schulz_over_ideal']:11.3f} "
                f"{whole / 1e9:18.1f} {row['update_over_model_flops']:17.3f}",
                flush=True,
            )
    muon_tps, adamw_tps = step_time("muon"), step_time("adamw")
    timing = {
        "muon_tokens_per_s": muon_tps,
        "adamw_tokens_per_s": adamw_tps,
        "muon_over_adamw": adamw_tps / muon_tps,
    }
    print(
        f"\nsmall on 8 simulated CPU devices (data=8, ZeRO-1, batch 16 x 256): Muon {muon_tps:.0f} tokens/s, "
        f"AdamW {adamw_tps:.0f} tokens/s, Muon/AdamW step time {timing['muon_over_adamw']:.2f}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(
        json.dumps({"inspect": rows, "step_time": timing}, indent=2)
    )


if __name__ == "__main__":
    main()
