"""Fit before you pay: the paper's models compiled by the TPU compiler for TPU
slices on this machine (no TPU needed), per chip: HBM against the chip's, and
a roofline estimate of the step time.

    python experiments/tpu_fit.py [--quick] [--part 16b|dense|cpu|kernels]

Each configuration is one `muonjax inspect --tpu SLICE --json` (its own
process); the results are a ledger keyed by the command, written after each
one, so a stopped sweep goes on where it stopped.

1. `16b`: Moonlight-16B-A3B at seq 8192 and the paper's ~16.8M-token batch
   (2048 sequences through gradient accumulation, one sequence per chip per
   micro-batch), bf16, full remat, on v5p slices of 64-256 chips (v5p-128 to
   v5p-512) with the experts over 8 chips, Muon and AdamW: the Muon/AdamW ratio
   of the estimated step time, and the optimizer update's share of it.
2. `dense`: the paper's Table 2 dense models (822M, 1.5B) at seq 8192 and Table
   2's batch on v5e and v5p slices.
3. `cpu`: per-chip bytes of `muonjax inspect` on simulated CPU devices against
   the TPU compiler's for the same mesh and kernels (the 16B, 64 chips).
4. `kernels`: the 1B MoE step (d_model 2048, 6 layers, 16 experts) compiled
   for v5p with the XLA path against splash attention and megablox.

Estimates, not measurements: nothing here has run on a TPU. Writes
results/tpu_fit/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results" / "tpu_fit"
SEQUENCES = 2048  # x 8192 = 16.8M tokens a step (the paper: ~16M)
XLA = ("--moe-dispatch", "ragged_dot", "--attention-kernel", "xla")
KERNELS = ("--moe-dispatch", "megablox", "--attention-kernel", "splash")


def moonlight(slice_, mesh, optimizer, kernels=(), sequences=SEQUENCES):
    """Moonlight-16B-A3B's step, kernels "auto" (on TPU: splash, megablox) unless given."""
    data_parallel = _data_parallel(mesh)
    return ("--tpu", slice_, "--preset", "moonlight-16b-a3b", "--mesh", mesh,
            "--optimizer", optimizer, "--seq-len", "8192", "--batch-size", str(sequences),
            "--grad-accum", str(sequences // data_parallel), "--dtype", "bfloat16",
            "--remat", "full", *kernels)  # fmt: skip


def dense(size, slice_, mesh, optimizer):
    """Table 2's model `size` (compute_efficiency.table2_model)."""
    from compute_efficiency import PAPER, table2_model

    row = PAPER["table2"][size]
    model = ",".join(f"{k}={v}" for k, v in table2_model(row).items())
    return ("--tpu", slice_, "--preset", "moonlight-16b-a3b", "--model", model, "--mesh", mesh,
            "--optimizer", optimizer, "--seq-len", "8192", "--batch-size", str(row["batch"]),
            "--grad-accum", str(row["batch"] // _data_parallel(mesh)), "--dtype", "bfloat16",
            "--remat", "full", "--attention-kernel", "xla")  # fmt: skip


def _data_parallel(mesh: str) -> int:
    from muonjax.parallel.mesh import BATCH_AXES, parse_mesh

    sizes = parse_mesh(mesh)
    return math.prod(sizes[a] for a in BATCH_AXES)


def plan(part: str, quick: bool) -> list[tuple[str, ...]]:
    """The inspect commands of `part`."""
    if quick:
        tiny = ("--preset", "tiny", "--seq-len", "128", "--batch-size", "8", "--grad-accum", "2")
        return {
            "16b": [("--tpu", "v5p-8", "--mesh", "data=2,expert=2", "--optimizer", o, *tiny, *XLA)
                    for o in ("muon", "adamw")],
            "dense": [("--tpu", "v5e-4", "--mesh", "data=4", "--optimizer", "adamw", *tiny)],
            "cpu": [("--tpu", "v5p-8", "--mesh", "data=2,expert=2", *tiny, *XLA)],
            "kernels": [("--tpu", "v5p-8", "--mesh", "data=4", *tiny, *k) for k in (XLA, KERNELS)],
        }[part]  # fmt: skip
    if part == "16b":
        meshes = {"v5p-128": "data=8,expert=8", "v5p-256": "data=16,expert=8",
                  "v5p-512": "data=32,expert=8"}  # fmt: skip
        return [moonlight(s, m, o) for s, m in meshes.items() for o in ("muon", "adamw")]
    if part == "dense":
        return [dense(size, s, m, o) for size, s, m in
                (("822M", "v5p-64", "data=32"), ("822M", "v5e-64", "data=32,tensor=2"),
                 ("1.5B", "v5p-64", "data=32"))
                for o in ("muon", "adamw")]  # fmt: skip
    if part == "cpu":  # the same mesh simulated on 64 CPU devices, the same kernels
        tiles = ("--moe-dispatch", "tiles", "--attention-kernel", "xla")
        return [moonlight("v5p-128", "data=8,expert=8", "muon", tiles, sequences=64)]
    one_b = ("--model", "d_model=2048,n_layers=6,first_k_dense=1,n_heads=16,n_routed_experts=16,"
             "experts_per_token=4,moe_intermediate_size=1408,intermediate_size=5632,"
             "vocab_size=32768")  # fmt: skip
    return [("--tpu", "v5p-8", "--preset", "moonlight-16b-a3b", *one_b, "--mesh", "data=4",
             "--seq-len", "2048", "--batch-size", "32", "--grad-accum", "8", "--dtype",
             "bfloat16", "--remat", "full", *k) for k in (XLA, KERNELS)]  # fmt: skip


def inspect(args: tuple[str, ...]) -> dict:
    """`muonjax inspect ARGS --json`'s report, or {"error": its last line}."""
    out = subprocess.run(
        [sys.executable, "-m", "muonjax", "inspect", *args, "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def on_cpu(args: tuple[str, ...]) -> tuple[str, ...]:
    """The same inspect, its mesh simulated by CPU devices instead."""
    i = args.index("--tpu")
    return args[:i] + args[i + 2 :]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models on v5p-8 / v5e-4")
    parser.add_argument("--part", choices=("16b", "dense", "cpu", "kernels"), action="append")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    path = out / "results.json"
    ledger = json.loads(path.read_text()) if path.exists() else {}
    for part in args.part or ("16b", "dense", "cpu", "kernels"):
        commands = plan(part, args.quick)
        if part == "cpu":
            commands = [c for tpu in commands for c in (tpu, on_cpu(tpu))]
        for command in commands:
            key = " ".join(command)
            if key in ledger:
                continue
            print(f"inspect {key}", flush=True)
            ledger = record(path, key, {"part": part, **inspect(command)})
    print(table(ledger))


def record(path: pathlib.Path, key: str, report: dict) -> dict:
    """The ledger at `path` with `report` added, written whole or not at all
    (read again first: two sweeps, one per part, may share it)."""
    ledger = json.loads(path.read_text()) if path.exists() else {}
    ledger[key] = report
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ledger, indent=1))
    tmp.replace(path)
    return ledger


def table(ledger: dict) -> str:
    """The docs' tables (markdown): per part, one row per configuration, Muon
    beside AdamW where both ran."""
    out = []
    for part in ("16b", "dense", "cpu", "kernels"):
        rows = {k: r for k, r in ledger.items() if r.get("part") == part}
        if rows:
            out += ["", f"{part}:", "", *ROWS[part](rows)]
    return "\n".join(out)


GIB = 2**30


def _model(key: str, r: dict) -> str:
    """Table 2's name of a dense model (non-embedding parameters), else the preset's."""
    from compute_efficiency import PAPER

    hidden = {f"d_model={row['hidden']},": size for size, row in PAPER["table2"].items()}
    name = next((f"dense {size}" for h, size in hidden.items() if h in key), r["preset"])
    return f"{name}, {r['batch_size']} x {r['seq_len']}"


def _pairs(rows: dict) -> list[str]:
    """Muon and AdamW side by side: HBM, fits, estimated step, ratio, optimizer share."""
    lines = ["| model | slice | mesh | HBM per chip, Muon / AdamW (GiB) | fits | estimated step, "
             "Muon / AdamW (s) | Muon / AdamW | optimizer's share (Muon) | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    muon = {k: r for k, r in rows.items() if r.get("optimizer") == "muon"}
    for key, m in muon.items():
        a = rows.get(key.replace("--optimizer muon", "--optimizer adamw"))
        if "error" in m or a is None or "error" in a:
            lines.append(f"| `{key}` | {m.get('error') or (a or {}).get('error', 'no AdamW')} |")
            continue
        lines.append(
            f"| {_model(key, m)} | {m['tpu']} | {m['mesh']} | {m['peak_bytes'] / GIB:.1f} / "
            f"{a['peak_bytes'] / GIB:.1f} | {'yes' if m['fits'] and a['fits'] else 'no'} | "
            f"{m['estimate_step_seconds']:.2f} / {a['estimate_step_seconds']:.2f} | "
            f"{m['estimate_step_seconds'] / a['estimate_step_seconds']:.3f} | "
            f"{m['estimate_optimizer_share']:.1%} | {m['compile_seconds']:.0f} |"
        )
    return lines


def _cpu(rows: dict) -> list[str]:
    lines = [
        "| compiled by | mesh | arguments | temporaries | peak (GiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows.values():
        if "error" not in r:
            mem = r["memory_bytes"]
            lines.append(
                f"| {r['platform'].upper()} | {r['mesh']} | {mem['argument'] / GIB:.2f} | "
                f"{mem['temp'] / GIB:.2f} | {r['peak_bytes'] / GIB:.2f} |"
            )
    return lines


def _kernels(rows: dict) -> list[str]:
    lines = ["| kernels | XLA FLOPs (per loop body) | XLA bytes accessed | peak (GiB) | "
             "estimated step (s) |", "|---|---|---|---|---|"]  # fmt: skip
    for key, r in rows.items():
        if "error" not in r:
            kernels = "splash, megablox" if "splash" in key else "XLA, ragged_dot"
            lines.append(
                f"| {kernels} | {r['xla_flops']:.3g} | {r['xla_bytes_accessed']:.3g} | "
                f"{r['peak_bytes'] / GIB:.2f} | {r['estimate_step_seconds']:.3f} |"
            )
    return lines


ROWS = {"16b": _pairs, "dense": _pairs, "cpu": _cpu, "kernels": _kernels}


if __name__ == "__main__":
    main()
