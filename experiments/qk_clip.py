"""QK-Clip (MuonClip, Kimi K2): does it keep Muon's attention logits bounded, and what does it cost?

    python experiments/qk_clip.py            # 6 runs + the step overhead, ~25 min on 2 cores
    python experiments/qk_clip.py --quick    # toy sizes, end to end in under a minute

The paper (App. D) sees Muon's max attention logits pass 100 early in
training; Kimi K2 bounds them with QK-Clip (`--qk-clip TAU`): after each step,
every head whose max logit in the step exceeded tau has its query and key
weights rescaled so that it would be tau (muonjax.optim.qk_clip).

The model and data are experiments/attention_logits.py's CPU setting (4 dense
layers, d_model 128, 4 heads, 400 steps of 16 x 128 tokens, cosine schedule),
trained with Muon (the Moonlight recipe) where its logits grow large: at a
learning rate 3x and 10x that experiment's 1e-2. Probes of 150 steps put the
max logit of MHA at 110 with lr 3e-2 and no weight decay, and at 400 with lr
1e-1 and weight decay 0.1. Three pairs, each run without and with QK-Clip:

- MHA, lr 3e-2, weight decay 0, tau 50 (below where the logits settle);
- MHA, lr 1e-1, weight decay 0.1, tau 100 (K2's threshold);
- MLA, lr 1e-1, weight decay 0.1, tau 100 (q_nope / k_nope by sqrt(gamma),
  q_rope by gamma, the shared rotary key untouched).

The logged max logit of a step comes from its forward pass, before that
step's clip: with QK-Clip it can exceed tau by what one update adds.

Overhead: the `small` preset's train step (batch 8 x 256, one CPU device)
with --qk-clip and without, compiled once each, timed alternately; the
median step times and their ratio.

Writes results/qk_clip/results.json and qk_clip.png.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import attention_logits  # noqa: E402
import common  # noqa: E402

NAME = "qk_clip"

# pair -> (label, attention, learning rate, weight decay, tau)
PAIRS = {
    "mha_3e-2": ("MHA, lr 3e-2, wd 0", "mha", 3e-2, 0.0, 50.0),
    "mha_1e-1": ("MHA, lr 1e-1, wd 0.1", "mha", 1e-1, 0.1, 100.0),
    "mla_1e-1": ("MLA, lr 1e-1, wd 0.1", "mla", 1e-1, 0.1, 100.0),
}
QUICK_PAIRS = ("mha_3e-2",)
QUICK_TAU = 0.05  # the toy model's logits stay near 0.1
TRAIN_KEYS = (*attention_logits.TRAIN_KEYS, "qk_clipped_heads", "qk_clipped_heads_per_layer")


def run_names(pairs) -> list[str]:
    return [f"{pair}{suffix}" for pair in pairs for suffix in ("", "_clip")]


def run_config(base: dict, name: str, out: str, quick: bool):
    from muonjax.train import TrainConfig

    pair = name.removesuffix("_clip")
    _, attention, lr, wd, tau = PAIRS[pair]
    fields = {**base, "model": {**base["model"], "attention": attention}}
    fields.update(learning_rate=lr, weight_decay=wd)
    if name.endswith("_clip"):
        fields["qk_clip"] = QUICK_TAU if quick else tau
    return TrainConfig(
        out=out, **fields, optimizer="muon", checkpoint_every=base["steps"], keep_checkpoints=1,
        progress=False, mesh=None,
    )  # fmt: skip


def summarize(run: dict, tau: float | None) -> dict:
    train = run["train"]
    overall = np.asarray(train["max_attention_logit"])
    final = {
        "eval_loss": run["final"]["eval_loss"],
        "train_loss": run["final"]["train_loss"],
        "max_logit_peak": float(overall.max()),
        "max_logit_final": float(overall[-1]),
        "max_logit_peak_per_layer": run["final"]["max_logit_peak_per_layer"],
        "tau": tau,
    }
    if tau is not None:
        clipped = np.asarray(train["qk_clipped_heads"])
        final["logged_steps_clipping"] = float(np.mean(clipped > 0))
        final["mean_clipped_heads"] = float(clipped.mean())
        final["max_logit_peak_over_tau"] = float(overall.max() / tau)
    return final


def train_runs(args, tmp) -> dict:
    base = attention_logits.cpu_base(args.quick)
    runs, configs = {}, {}
    for name in run_names(QUICK_PAIRS if args.quick else PAIRS):
        config = run_config(base, name, str(pathlib.Path(tmp) / name), args.quick)
        label = PAIRS[name.removesuffix("_clip")][0]
        label += f", QK-Clip {config.qk_clip:g}" if config.qk_clip else ", no clip"
        print(f"{label}: training {config.steps} steps ...", flush=True)
        keys = TRAIN_KEYS if config.qk_clip else attention_logits.TRAIN_KEYS
        r = attention_logits.train_one(config, lambda *_: None, keys)
        r.pop("_parameters")
        r["final"] = summarize(r, config.qk_clip)
        runs[name] = {"label": label, **r}
        configs[name] = {**config.to_json(), "out": None}
        f = r["final"]
        print(
            f"{label}: eval loss {f['eval_loss']:.4f}, max logit peak {f['max_logit_peak']:.1f}, "
            f"final {f['max_logit_final']:.1f}, {r['wall_time_s']:.0f} s",
            flush=True,
        )
    return {"base": base, "runs": runs, "configs": configs}


def step_overhead(args, tmp, base: dict) -> dict:
    """Median train-step time of `small` with and without QK-Clip, the two
    programs timed alternately after compiling. --quick times the quick runs'
    own two configs (their programs are in the compilation cache by then)."""
    import jax

    from muonjax.parallel import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.program import build

    if args.quick:
        plain, clipped = (run_config(base, n, str(tmp), True) for n in run_names(QUICK_PAIRS))
        configs, rounds, per_round = {"off": plain, "on": clipped}, 3, 2
    else:  # tau 1e-3: every head clips (the work is the same either way)
        small = TrainConfig(preset="small", batch_size=8, seq_len=256)
        configs, rounds, per_round = {"off": small, "on": small.replace(qk_clip=1e-3)}, 7, 5
    preset, batch, seq = configs["off"].preset, configs["off"].batch_size, configs["off"].seq_len
    mesh = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, 256, (batch, seq + 1)).astype(np.int32)
    programs, states, times = {}, {}, {"off": [], "on": []}
    for key, config in configs.items():
        program = build(config, config.model_config(vocab_size=256), mesh)
        state = program.init()
        state, metrics = program.step(state, jax.device_put(tokens, program.batch))  # compiles
        jax.block_until_ready(metrics)
        programs[key], states[key] = program, state
    for _ in range(rounds):
        for key in ("off", "on"):
            program = programs[key]
            batch_on_device = jax.device_put(tokens, program.batch)
            for _ in range(per_round):
                started = time.perf_counter()
                states[key], metrics = program.step(states[key], batch_on_device)
                jax.block_until_ready(metrics)
                times[key].append(time.perf_counter() - started)
    off, on = (float(np.median(times[k])) for k in ("off", "on"))
    clipped = int(jax.device_get(metrics["qk_clipped_heads"]))
    print(f"{preset} step: {off * 1e3:.1f} ms without QK-Clip, {on * 1e3:.1f} ms with "
          f"({clipped} heads clipped): ratio {on / off:.3f}", flush=True)  # fmt: skip
    return {
        "preset": preset, "batch_size": batch, "seq_len": seq, "steps_each": len(times["on"]),
        "step_s_without": off, "step_s_with": on, "ratio": on / off, "heads_clipped": clipped,
        "times_s": times,
    }  # fmt: skip


def markdown(results: dict) -> str:
    lines = [
        "| run | final eval loss | max logit: peak / final | steps clipping | heads clipped "
        "(mean) |",
        "|---|---|---|---|---|",
    ]
    for r in results["runs"].values():
        f = r["final"]
        clipping = (
            f"{f['logged_steps_clipping']:.0%} | {f['mean_clipped_heads']:.1f}"
            if f["tau"]
            else "- | -"
        )
        lines.append(
            f"| {r['label']} | {f['eval_loss']:.4f} | {f['max_logit_peak']:.3g} / "
            f"{f['max_logit_final']:.3g} | {clipping} |"
        )
    o = results["overhead"]
    lines += [
        "",
        f"Step time, `{o['preset']}` ({o['batch_size']} x {o['seq_len']}): "
        f"{o['step_s_without'] * 1e3:.1f} ms without QK-Clip, {o['step_s_with'] * 1e3:.1f} ms "
        f"with: {o['ratio']:.3f}x (median of {o['steps_each']} steps each).",
    ]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    """Per pair: the max logit over layers per step (top) and the eval loss
    (bottom), without QK-Clip (red) and with it (blue), tau dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in PAIRS if p in results["runs"]]
    fig, axes = plt.subplots(2, len(pairs), figsize=(5.5 * len(pairs), 7.5), squeeze=False)
    for col, pair in enumerate(pairs):
        top, bottom = axes[0, col], axes[1, col]
        for name, color in ((pair, "tab:red"), (f"{pair}_clip", "tab:blue")):
            r = results["runs"][name]
            label = r["label"].split(", ")[-1]
            top.plot(r["train"]["step"], r["train"]["max_attention_logit"], color=color,
                     label=label)  # fmt: skip
            bottom.plot(r["eval"]["step"], r["eval"]["eval_loss"], color=color, label=label)
            if r["final"]["tau"]:
                top.axhline(r["final"]["tau"], color="grey", ls=":", lw=1, label="tau")
        top.set_title(f"{PAIRS[pair][0]}: max attention logit (all layers)", fontsize=10)
        bottom.set_title("validation loss", fontsize=10)
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = common.arguments(NAME, __doc__, argv)
    if args.scale == "pod":
        raise SystemExit("qk_clip.py runs on the CPU only (--scale cpu)")
    out = pathlib.Path(args.out)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qk_clip-") as tmp:
        results = {"quick": args.quick, **train_runs(args, tmp)}
        results["overhead"] = step_overhead(args, tmp, results["base"])
    results["wall_time_s"] = time.perf_counter() - started
    print()
    print(markdown(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s in all")
    path = common.write_results(out, results)
    plot(results, out / f"{NAME}.png", f"QK-Clip with Muon ({'quick' if args.quick else 'cpu'}): "
         f"{attention_logits.cpu_base(args.quick)['steps']} steps")  # fmt: skip
    print(f"wrote {path} and {out / f'{NAME}.png'}")
    return 0


if __name__ == "__main__":
    common.start_jax()
    sys.exit(main())
