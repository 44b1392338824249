"""Muon (Moonlight recipe) against AdamW on a byte-level MLP language model.

    python experiments/demo_optimizer.py [--steps 300]

The text is this Python's own standard library source (every machine has it).
A model predicts the next byte from the previous 16 through an embedding, two
hidden matrices and an LM head. Both optimizers get the same learning rate
schedule and weight decay, as in the paper; Muon's 0.2 * sqrt(max(A, B)) scale
is what lets the hidden matrices share AdamW's learning rate.
"""

from __future__ import annotations

import argparse
import pathlib
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import muonjax

CONTEXT, EMBED, HIDDEN, VOCAB = 16, 32, 512, 256


def stdlib_bytes(limit: int) -> np.ndarray:
    """The first `limit` bytes of the stdlib's .py files, in sorted path order."""
    chunks, total = [], 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return np.frombuffer(b"".join(chunks)[:limit], np.uint8)


def init(key):
    k = jax.random.split(key, 4)
    normal = lambda k, fan_in, shape: jax.random.normal(k, shape) / np.sqrt(fan_in)
    return {
        "embed": normal(k[0], 1, (VOCAB, EMBED)),
        "hidden1": {
            "kernel": normal(k[1], CONTEXT * EMBED, (CONTEXT * EMBED, HIDDEN)),
            "bias": jnp.zeros(HIDDEN),
        },
        "hidden2": {"kernel": normal(k[2], HIDDEN, (HIDDEN, HIDDEN)), "bias": jnp.zeros(HIDDEN)},
        "lm_head": {"kernel": normal(k[3], HIDDEN, (HIDDEN, VOCAB))},
    }


def loss_fn(params, windows):
    x = params["embed"][windows[:, :-1]].reshape(windows.shape[0], -1)
    for layer in ("hidden1", "hidden2"):
        x = jax.nn.gelu(x @ params[layer]["kernel"] + params[layer]["bias"])
    logits = x @ params["lm_head"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, -1]).mean()


def group_rms(tree, labels, group):
    leaves = [x for x, lab in zip(jax.tree.leaves(tree), jax.tree.leaves(labels)) if lab == group]
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves) / sum(x.size for x in leaves))


def train(tx, schedule, data, steps, batch, seed=0):
    params = init(jax.random.key(seed))
    labels = muonjax.moonlight_labels(params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, state = tx.update(grads, state, params)
        rms = {g: group_rms(updates, labels, g) for g in ("muon", "adamw")}
        return optax.apply_updates(params, updates), state, loss, rms

    rng = np.random.default_rng(seed)
    offsets = np.arange(CONTEXT + 1)
    train_end = int(0.9 * len(data))
    losses, rms = [], []
    start = None
    for i in range(steps):
        if i == 1:
            start = time.perf_counter()  # exclude compilation
        idx = rng.integers(0, train_end - CONTEXT - 1, batch)
        params, state, loss, r = step(params, state, data[idx[:, None] + offsets])
        losses.append(float(loss))
        lr = float(schedule(i))
        if lr > 0.1 * float(schedule(steps // 10)):  # per unit lr, away from lr ~ 0
            rms.append({k: float(v) / lr for k, v in r.items()})
    seconds_per_step = (time.perf_counter() - start) / (steps - 1)
    held_out = data[train_end:]
    idx = np.arange(0, len(held_out) - CONTEXT - 1, 7)[:8192]
    eval_loss = float(jax.jit(loss_fn)(params, held_out[idx[:, None] + offsets]))
    last = slice(-20, None)
    return {
        "train_loss": float(np.mean(losses[last])),
        "eval_loss": eval_loss,
        "seconds_per_step": seconds_per_step,
        "rms_muon": float(np.mean([r["muon"] for r in rms])),
        "rms_adamw": float(np.mean([r["adamw"] for r in rms])),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()

    data = stdlib_bytes(4_000_000)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.learning_rate, args.steps // 10, args.steps
    )
    optimizers = {
        "muon (moonlight)": muonjax.moonlight(schedule, weight_decay=0.1),
        "adamw": optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1),
    }
    print(
        f"{len(data) / 1e6:.1f} MB of stdlib source, {args.steps} steps of {args.batch} windows\n"
    )
    header = f"{'optimizer':18s} {'train loss':>10s} {'eval loss':>10s} {'ms/step':>8s} {'RMS hidden':>10s} {'RMS embed/head/bias':>20s}"
    print(header)
    print("-" * len(header))
    for name, tx in optimizers.items():
        r = train(tx, schedule, data, args.steps, args.batch)
        print(
            f"{name:18s} {r['train_loss']:10.3f} {r['eval_loss']:10.3f} {r['seconds_per_step'] * 1e3:8.1f} "
            f"{r['rms_muon']:10.3f} {r['rms_adamw']:20.3f}"
        )
    print("\nRMS: update RMS of each parameter group divided by the learning rate, averaged over")
    print("the steps where lr > 10% of its peak. Muon's is about 0.2 by construction (Eq. 4).")


if __name__ == "__main__":
    main()
