"""What the benchmark scripts (bench_generate, bench_hf_load, ns_dtype,
reliability) share: --quick / --out and a results.json that
keeps what other modes wrote. JAX starts by sweep.start_jax(), as for the findings' scripts."""

from __future__ import annotations

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def arguments(name: str, doc: str, argv=None) -> argparse.Namespace:
    """--quick: end to end in under a minute; --out: default results/<name>, or
    results/<name>/scratch with --quick."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="toy sizes, for the test suite")
    parser.add_argument("--out", help="results folder (default: results/<experiment>)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "results" / name / ("scratch" if args.quick else ""))
    return args


def write_results(out: str | pathlib.Path, results: dict) -> pathlib.Path:
    """Writes OUT/results.json: `results` on top of what is there from the same
    mode (--quick or not)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("quick") == results.get("quick"):
            results = {**old, **results}
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path
