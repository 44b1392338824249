"""What the paper-reproduction scripts share: their command line (--scale
cpu|pod, --quick, --out), JAX start-up, results files, and reading a run's
parameters by the paper's matrix groups."""

from __future__ import annotations

import argparse
import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def arguments(name: str, doc: str, argv=None) -> argparse.Namespace:
    """--scale cpu (default: runs here) | pod (the paper's sizes: build and
    inspect the configs, do not train); --quick: end to end in under a minute;
    --out: default results/<name>, or a scratch folder with --quick."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--scale", choices=("cpu", "pod"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for the test suite")
    parser.add_argument("--mesh", default="data=8", help="--scale pod: the mesh to inspect on")
    parser.add_argument("--out", help=f"results folder (default: results/{name})")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "results" / name / ("scratch" if args.quick else ""))
    return args


def start_jax(devices: int = 1) -> None:
    """One process for the whole sweep: set the CPU device count before JAX's backend starts."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # already started (e.g. under pytest): keep its devices
        pass
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_results(out: str | pathlib.Path, name: str, results: dict) -> pathlib.Path:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def final_params(run_dir: str | pathlib.Path) -> dict:
    """The parameters of a run's newest checkpoint, as a nested dict of NumPy arrays."""
    import orbax.checkpoint as ocp

    checkpoints = pathlib.Path(run_dir).absolute() / "checkpoints"
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    state = ocp.StandardCheckpointer().restore(checkpoints / str(step) / "state")
    return state["params"]


# The paper's groups (Fig. 4, Table 1), by a parameter's path in muonjax's model.
MATRIX_GROUPS = {
    "q_proj": "AttnQ",
    "q_a_proj": "AttnQ",
    "q_b_proj": "AttnQ",
    "k_proj": "AttnKV",
    "v_proj": "AttnKV",
    "kv_a_proj": "AttnKV",
    "kv_b_proj": "AttnKV",
    "o_proj": "AttnO",
    "mlp": "Dense",
    "experts": "Experts",
    "shared": "SharedExperts",
    "router": "Router",
}


def matrix_group(path: tuple[str, ...]) -> str | None:
    """AttnQ / AttnKV / AttnO / Dense / Experts / SharedExperts / Router for a
    hidden matrix's path, None for embeddings, the head, norms and biases."""
    if path[-1] in ("scale", "bias", "embedding") or path[0] in ("embed", "lm_head"):
        return None
    for key in reversed(path):
        if key in MATRIX_GROUPS:
            return MATRIX_GROUPS[key]
    return None


def leaves_by_group(params: dict) -> dict[str, list]:
    """{group: [arrays]} over the hidden matrices of a params tree (nested dicts)."""
    groups: dict[str, list] = {}

    def walk(tree, path):
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, (*path, key))
        else:
            group = matrix_group(tuple(k for k in path if k != "value"))
            if group is not None:
                groups.setdefault(group, []).append(tree)

    walk(params, ())
    return groups
