"""QK-Clip (MuonClip, Kimi K2): Muon's attention logits bounded, at what cost in loss?

    python experiments/qk_clip.py               # --scale cpu: ~8 runs, ~8 minutes
    python experiments/qk_clip.py --scale gpu   # attention_logits.py's gpu model
    python experiments/qk_clip.py --scale pod   # Moonlight-16B-A3B, tau 100 (K2's)
    ... --quick (toy sizes, end to end in a minute) | --dry-run (configs and memory only)

Kimi K2 trains with QK-Clip (`--qk-clip TAU`): after each step, every head whose
max logit in the step exceeded tau has its query and key weights rescaled so
that it would be tau (muonjax.optim.qk_clip); the claim is that this bounds the
logits at no cost in loss. Here Muon (the Moonlight recipe, MLA) trains
attention_logits.py's model and data at each scale: its rate swept on the
quarter-decade grid (on past an edge while the best is at one), 2 seeds, without
QK-Clip; then at the best rate (final_eval_loss seed means) with QK-Clip at a tau
that must fire there: half the unclipped runs' peak max logit (seed mean, two
significant digits; pod: K2's 100, where no sweep runs first). Paired over seeds,
clipped minus unclipped: the peak max logit (reproduced if its 95% interval is
below 0), the final eval loss (reproduced if its interval lies within
+-LOSS_MARGIN nats; not reproduced if wholly above it); the share of logged steps
that clipped. The step time with and without QK-Clip (the scale's model, every
head clipping, medians of alternating rounds) is the overhead.
"""

from __future__ import annotations

import pathlib
import time

import attention_logits
import numpy as np
import sweep

NAME = "qk_clip"
LOSS_MARGIN = 0.01  # nats: a smaller loss difference counts as no cost
PAPER = {"setting": "Kimi K2 (1T MoE, MLA) with MuonClip, tau 100",
         "claim": "QK-Clip bounds the max attention logit at tau without hurting the loss"}  # fmt: skip


def scale_setup(scale: str, quick: bool, devices: int) -> dict:
    """attention_logits.py's setting, Muon and MLA only; pod clips at K2's tau."""
    setup = attention_logits.scale_setup(scale, quick, devices)
    tau = 100.0 if scale == "pod" and not quick else None
    return dict(setup, model=setup["models"]["mla"], start=setup["start"]["muon"], tau=tau)


def fields(setup, lr, seed, mesh, tau=None) -> dict:
    return dict(setup["base"], model=setup["model"], optimizer="muon", learning_rate=lr,
                seed=seed, mesh=mesh, qk_clip=tau)  # fmt: skip


def measure(run_dir, summary) -> dict:
    """attention_logits.py's measures, and the share of logged steps that clipped."""
    from muonjax.train import read_metrics

    clipped = [r["qk_clipped_heads"] for r in read_metrics(run_dir) if "qk_clipped_heads" in r]
    share = float(np.mean(np.asarray(clipped) > 0)) if clipped else None
    return {**attention_logits.measure(run_dir, summary), "steps_clipping": share}


def train(args, ledger: sweep.Ledger, setup: dict) -> dict:
    """The unclipped sweep, the clipped runs at its best rate, their tau and analysis;
    and the step overhead at that rate."""
    from muonjax.train import TrainConfig

    runs = []

    def loss(lr, tau=None):
        new, mean = sweep.train_seeds(
            ledger, lambda seed: fields(setup, lr, seed, args.mesh, tau), setup["seeds"],
            f"muon lr {lr:g}" + (f", QK-Clip {tau:g}" if tau else ""), measure,
            learning_rate=lr, tau=tau)  # fmt: skip
        runs.extend(new)
        return mean

    best = sweep.best_rate(sweep.sweep_rates(loss, setup["start"], setup["extend"]))
    tau = setup["tau"]
    if best is not None:
        if tau is None:
            peaks = [r["max_logit_peak"] for r in runs if r["learning_rate"] == best]
            tau = float(f"{np.mean(peaks) / 2:.2g}")
        loss(best, tau)
    config = TrainConfig(**fields(setup, best or setup["start"][0], 0, args.mesh))
    return {"runs": runs, "tau": tau, "analysis": analyse(runs), "overhead": step_overhead(config),
            "base": setup["base"]}  # fmt: skip


def analyse(runs: list[dict]) -> dict:
    """Clipped minus unclipped at the clipped runs' rate, paired over seeds."""
    clipped = {r["seed"]: r for r in runs if r["tau"] and r["final_eval_loss"] is not None}
    if not clipped:
        return {}
    lr = next(iter(clipped.values()))["learning_rate"]
    plain = {r["seed"]: r for r in runs if not r["tau"] and r["learning_rate"] == lr
             and r["final_eval_loss"] is not None}  # fmt: skip
    diff = {k: sweep.paired({s: r[k] for s, r in clipped.items()},
                            {s: r[k] for s, r in plain.items()})
            for k in ("max_logit_peak", "final_eval_loss")}  # fmt: skip
    loss = diff["final_eval_loss"]
    lo, hi = loss.mean - loss.half_width, loss.mean + loss.half_width
    no_cost = ("reproduced" if -LOSS_MARGIN <= lo and hi <= LOSS_MARGIN
               else "not reproduced" if lo > LOSS_MARGIN else "inconclusive")  # fmt: skip
    share = sweep.estimate(r["steps_clipping"] for r in clipped.values())
    return {"learning_rate": lr, "steps_clipping": share.to_json(),
            "peak_clip_minus_plain": diff["max_logit_peak"].to_json(),
            "loss_clip_minus_plain": loss.to_json(),
            "verdict_bounded": sweep.verdict(diff["max_logit_peak"], -1),
            "verdict_no_cost": no_cost}  # fmt: skip


def step_overhead(config, rounds: int = 5, per_round: int = 3) -> dict:
    """Median step time of `config` without and with QK-Clip (tau 1e-3: every
    head clips), the two compiled programs timed in alternating rounds."""
    import jax

    from muonjax.parallel.mesh import run_mesh
    from muonjax.train.program import build

    config = config.replace(tokenizer="byte", init_from=None)
    mesh = run_mesh(config.mesh, config.batch_size, config.grad_accum)
    tokens = np.random.default_rng(0).integers(0, 256, (config.batch_size, config.seq_len + 1))
    programs, times = {}, {"off": [], "on": []}
    for key, tau in (("off", None), ("on", 1e-3)):
        program = build(config.replace(qk_clip=tau), config.model_config(vocab_size=256), mesh)
        batch = jax.device_put(tokens.astype(np.int32), program.batch)
        state, metrics = program.step(program.init(), batch)  # compiles
        programs[key] = [program, state, batch, jax.block_until_ready(metrics)]
    for _ in range(rounds):
        for key, entry in programs.items():
            program, state, batch, _ = entry
            for _ in range(per_round):
                started = time.perf_counter()
                state, metrics = program.step(state, batch)
                jax.block_until_ready(metrics)
                times[key].append(time.perf_counter() - started)
            entry[1], entry[3] = state, metrics
    off, on = (float(np.median(times[k])) for k in ("off", "on"))
    heads = int(jax.device_get(programs["on"][3]["qk_clipped_heads"]))
    return {"step_s_without": off, "step_s_with": on, "ratio": on / off, "heads_clipped": heads,
            "steps_each": len(times["on"])}  # fmt: skip


def markdown(results: dict) -> str:
    cell = lambda e, f: f"{e['mean']:{f}}" + (f" ± {e['half_width']:{f}}" if e["n"] > 1 else "")  # fmt: skip
    rows = [sweep.table_row("lr", "QK-Clip tau", "final eval loss", "peak max logit",
                            "final max logit", "steps clipping"), sweep.table_row(*["---"] * 6)]  # fmt: skip
    for (lr, tau), by_seed in _points(results["runs"]).items():
        e = {k: sweep.estimate(r[k] for r in by_seed).to_json()
             for k in ("final_eval_loss", "max_logit_peak", "max_logit_final")}  # fmt: skip
        share = sweep.estimate(r["steps_clipping"] for r in by_seed if r["steps_clipping"] is not None)  # fmt: skip
        rows.append(sweep.table_row(f"{lr:g}", f"{tau:g}" if tau else "-",
                                    cell(e["final_eval_loss"], ".4f"), cell(e["max_logit_peak"], ".3g"),
                                    cell(e["max_logit_final"], ".3g"),
                                    f"{share.mean:.0%}" if tau else "-"))  # fmt: skip
    a, o = results["analysis"], results["overhead"]
    if a:
        rows += ["", f"At lr {a['learning_rate']:g}, QK-Clip minus none, paired over seeds: peak max "
                 f"logit {sweep.estimate(a['peak_clip_minus_plain']['values'])} "
                 f"({a['verdict_bounded']}); final eval loss "
                 f"{sweep.estimate(a['loss_clip_minus_plain']['values'])} ({a['verdict_no_cost']}, "
                 f"margin {LOSS_MARGIN} nats)."]  # fmt: skip
    rows += ["", f"Step time: {o['step_s_without'] * 1e3:.1f} ms without QK-Clip, "
             f"{o['step_s_with'] * 1e3:.1f} ms with every head clipping: {o['ratio']:.3f}x."]  # fmt: skip
    return "\n".join(rows)


def _points(runs) -> dict:
    """{(rate, tau): [finished runs]} in the order trained."""
    out = {}
    for r in runs:
        if r["final_eval_loss"] is not None:
            out.setdefault((r["learning_rate"], r["tau"]), []).append(r)
    return out


def plot(results: dict, path: pathlib.Path) -> None:
    """Left: the max logit (max over layers) against the step, per seed, at the
    clipped rate without (red) and with QK-Clip (blue), tau dotted. Right: final
    eval loss against the rate (seed means, 95% intervals), the clipped point in blue."""
    fig, (curve_ax, loss_ax) = sweep.figure(1, 2, (12, 4.5))
    a, points = results["analysis"], _points(results["runs"])
    for (lr, tau), by_seed in points.items():
        if a and lr == a["learning_rate"]:
            for r in by_seed:
                curve = np.max(r["curve"]["max_logit_per_layer"], axis=1)
                curve_ax.plot(r["curve"]["step"], curve, color="tab:blue" if tau else "tab:red",
                              label=f"seed {r['seed']}, " + (f"tau {tau:g}" if tau else "no clip"))  # fmt: skip
            if tau:
                curve_ax.axhline(tau, color="0.4", ls=":", lw=1)
    plain = sorted((lr, s) for (lr, tau), s in points.items() if not tau)
    estimates = [sweep.estimate(r["final_eval_loss"] for r in s) for _, s in plain]
    sweep.error_bars(loss_ax, [lr for lr, _ in plain], estimates, "no clip", color="tab:red")
    for (lr, tau), s in points.items():
        if tau:
            sweep.error_bars(loss_ax, [lr], [sweep.estimate(r["final_eval_loss"] for r in s)],
                             f"QK-Clip {tau:g}", color="tab:blue")  # fmt: skip
    curve_ax.set(xlabel="step", ylabel="max attention logit", title="at the best rate")
    loss_ax.set(xscale="log", xlabel="learning rate", ylabel="final eval loss")
    b = results["base"]
    sweep.save(
        fig,
        path,
        results,
        "QK-Clip with Muon",
        f"{b['steps']} steps x {b['batch_size']} x {b['seq_len']}, {len(results['runs'])} runs",
    )


def configs(args, setup: dict) -> dict:
    """--dry-run's configs: Muon at its first rate, without and with QK-Clip."""
    from muonjax.train import TrainConfig

    lr = setup["start"][0]
    return {f"muon-{k}": TrainConfig(**fields(setup, lr, 0, args.mesh, tau))
            for k, tau in (("plain", None), ("clip", 100.0))}  # fmt: skip


FINDING = sweep.Finding(NAME, __doc__, PAPER, scale_setup, configs, train, markdown, plot)
main = FINDING.main

if __name__ == "__main__":
    FINDING.command()
