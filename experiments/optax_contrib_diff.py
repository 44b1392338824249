"""muonjax.muon / moonlight against optax.contrib.muon (optax 0.2.8), measured.

    python experiments/optax_contrib_diff.py     # a few seconds on 2 cores

One (256, 512) matrix, five fixed random gradients, lr 1e-3, no weight decay:
per step, the update RMS / lr of each and their relative difference
||u_optax - u_ours||_F / ||u_ours||_F, (a) at defaults, (b) with optax's scale
set to ours (consistent_rms=0.2, eps=1e-7): what is left is optax's
bias-corrected Nesterov blend, N ~ c_t G + mu M with c_t = (1 - mu^(t+1)) /
(1 - mu^t) where ours has c_t = 1; (c) our Newton-Schulz on that blend
reproduces optax's update; (d) without Nesterov both coincide. Then where each
sends a (4, 64, 64) stack, a 2-D embedding and a bias by default, and the first
update's RMS / lr there. Writes results/optax_contrib_diff/results.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import optax

import muonjax

LR, MU, STEPS, SHAPE = 1e-3, 0.95, 5, (256, 512)
OUT = pathlib.Path(__file__).resolve().parent.parent / "results" / "optax_contrib_diff"


def _rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def _updates(tx, params, grads):
    state, update = tx.init(params), jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update({"w": g}, state, params)
        out.append(u["w"])
    return out


def _blend(grads):
    """optax's Nesterov blend, in our (unnormalized) momentum, orthogonalized by us."""
    m, out = jnp.zeros(SHAPE), []
    for t, g in enumerate(grads, start=1):
        m = MU * m + g
        n = (1 - MU ** (t + 1)) / (1 - MU**t) * g + MU * m
        out.append(-LR * 0.2 * max(SHAPE) ** 0.5 * muonjax.orthogonalize(n))
    return out


def _compare(ours, theirs):
    rows = []
    for t, (a, b) in enumerate(zip(ours, theirs), start=1):
        fit = float(jnp.vdot(b, a) / jnp.vdot(a, a))  # theirs ~ fit * ours
        rows.append(
            {
                "step": t,
                "ours_rms_over_lr": _rms(a) / LR,
                "optax_rms_over_lr": _rms(b) / LR,
                "rel_diff": float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a)),
                "scalar_fit": fit,
                "rel_diff_after_fit": float(jnp.linalg.norm(b - fit * a) / jnp.linalg.norm(b)),
            }
        )
    return rows


def _routing():
    params = {
        "embed": {"embedding": jnp.zeros((1000, 64))},
        "layers": {"w": jnp.zeros((4, 64, 64))},
        "bias": jnp.zeros((64,)),
    }
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    optax_tx, ours_tx = optax.contrib.muon(LR), muonjax.moonlight(LR, weight_decay=0.0)
    optax_state = optax_tx.init(params)
    # optax's Muon branch holds a MaskedNode where a leaf went to its Adam branch
    muon_mu = optax_state.inner_states["muon"].inner_state[0].mu
    columns = zip(
        jax.tree.leaves(muonjax.moonlight_labels(params)),
        jax.tree.leaves(ours_tx.update(grads, ours_tx.init(params), params)[0]),
        ["adam" if is_masked(x) else "muon" for x in jax.tree.leaves(muon_mu, is_leaf=is_masked)],
        jax.tree.leaves(optax_tx.update(grads, optax_state, params)[0]),
    )
    return {
        "/".join(k.key for k in path): {
            "shape": list(x.shape),
            "ours_group": ours_group,
            "ours_rms_over_lr": _rms(ours) / LR,
            "optax_group": optax_group,
            "optax_rms_over_lr": _rms(theirs) / LR,
        }
        for (path, x), (ours_group, ours, optax_group, theirs) in zip(
            jax.tree_util.tree_leaves_with_path(params), columns
        )
    }


def main(out=OUT) -> dict:
    params = {"w": jax.random.normal(jax.random.key(0), SHAPE) * 0.02}
    grads = [jax.random.normal(k, SHAPE) for k in jax.random.split(jax.random.key(2), STEPS)]
    ours = _updates(muonjax.muon(LR, weight_decay=0.0), params, grads)
    ours_plain = _updates(muonjax.muon(LR, weight_decay=0.0, nesterov=False), params, grads)
    matched = dict(consistent_rms=0.2, eps=1e-7)  # optax's scale and eps set to ours
    theirs = _updates(optax.contrib.muon(LR, **matched), params, grads)
    results = {
        "lr": LR,
        "shape": list(SHAPE),
        "steps": STEPS,
        "optax_version": optax.__version__,
        "defaults": _compare(ours, _updates(optax.contrib.muon(LR), params, grads)),
        "matched_scale": _compare(ours, theirs),
        "optax_blend_by_us": _compare(_blend(grads), theirs),
        "no_nesterov": _compare(
            ours_plain, _updates(optax.contrib.muon(LR, nesterov=False, **matched), params, grads)
        ),
        "blend_c_t": {t: (1 - MU ** (t + 1)) / (1 - MU**t) for t in (1, 2, 3, 5, 10, 20, 50)},
        "routing": _routing(),
    }
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for name in ("defaults", "matched_scale", "optax_blend_by_us", "no_nesterov"):
        print(f"\n{name}\nstep  ours rms/lr  optax rms/lr  rel diff  fit    rel diff after fit")
        for r in results[name]:
            print(
                f"{r['step']:>4}  {r['ours_rms_over_lr']:11.4f}  {r['optax_rms_over_lr']:12.4f}"
                f"  {r['rel_diff']:8.2e}  {r['scalar_fit']:.4f} {r['rel_diff_after_fit']:9.2e}"
            )
    print("\nleaf              shape          ours (rms/lr)    optax.contrib.muon (rms/lr)")
    for p, r in results["routing"].items():
        print(
            f"{p:<17} {str(tuple(r['shape'])):<14} {r['ours_group']:<5} {r['ours_rms_over_lr']:7.4f}"
            f"    {r['optax_group']:<5} {r['optax_rms_over_lr']:7.4f}"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT), help="results folder")
    main(parser.parse_args().out)
