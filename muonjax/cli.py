"""The `muonjax` command line. Bad input: one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

from muonjax.parallel.mesh import MeshError
from muonjax.train.config import OPTIMIZERS, TOKENIZERS, ConfigError, TrainConfig

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _train_parser(subparsers) -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a model",
        description="Train a Moonlight-style MoE language model with Muon (the Moonlight recipe) "
        "or AdamW. Outputs in --out: config.json, metrics.jsonl, tensorboard/, checkpoints/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Every default is None here so that --resume can tell which flags were
    # given; the real defaults come from TrainConfig (shown in --help).
    add = lambda flag, help, default, **kw: p.add_argument(
        flag, help=f"{help} (default: {default})", **kw
    )
    add("--preset", "model preset: tiny, small, moonlight-16b-a3b", defaults.preset)
    add(
        "--optimizer",
        f"{' | '.join(OPTIMIZERS)}; muon is the Moonlight recipe (Muon for hidden matrices, AdamW for embeddings, head, norms)",
        defaults.optimizer,
    )
    add("--steps", "number of optimizer steps in the run", defaults.steps, type=int)
    add(
        "--batch-size",
        "global batch size in sequences; divisible by the data-parallel size",
        defaults.batch_size,
        type=int,
    )
    add("--seq-len", "tokens per sequence", defaults.seq_len, type=int)
    add(
        "--learning-rate",
        "peak learning rate, shared by Muon and AdamW",
        defaults.learning_rate,
        type=float,
    )
    add(
        "--warmup-steps", "linear warmup steps before cosine decay", defaults.warmup_steps, type=int
    )
    add(
        "--decay-steps",
        "cosine decay horizon in steps (lr ends at 10%% of peak there); fix it to extend a run later",
        "--steps",
        type=int,
    )
    add(
        "--weight-decay",
        "decoupled weight decay, shared by Muon and AdamW",
        defaults.weight_decay,
        type=float,
    )
    add("--seed", "seed for initialization and data order", defaults.seed, type=int)
    add(
        "--data",
        "text files, folders or globs to train on (several allowed)",
        "the Python standard library's source",
        nargs="+",
    )
    add(
        "--tokenizer",
        f"{' | '.join(TOKENIZERS)}: raw UTF-8 bytes, or a byte-level BPE trained on the run's data and saved with it",
        defaults.tokenizer,
    )
    add(
        "--bpe-vocab-size",
        "vocabulary size of the BPE tokenizer",
        defaults.bpe_vocab_size,
        type=int,
    )
    add(
        "--validation-fraction",
        "fraction of the text held out for evaluation (the end of the corpus)",
        defaults.validation_fraction,
        type=float,
    )
    add("--out", "run directory; must not exist unless --resume", defaults.out)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete checkpoint; flags not given keep the run's values",
    )
    add("--checkpoint-every", "steps between checkpoints", defaults.checkpoint_every, type=int)
    add(
        "--keep-checkpoints",
        "how many recent checkpoints to keep",
        defaults.keep_checkpoints,
        type=int,
    )
    add(
        "--eval-every",
        "steps between evaluations on the held-out text",
        defaults.eval_every,
        type=int,
    )
    add("--eval-batches", "batches per evaluation", defaults.eval_batches, type=int)
    add("--log-every", "steps between metrics lines", defaults.log_every, type=int)
    add(
        "--max-nonfinite",
        "consecutive non-finite steps (skipped) before the run stops",
        defaults.max_nonfinite,
        type=int,
    )
    add("--cpu-devices", "simulate this many devices on the CPU", "the real devices", type=int)
    p.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, help="no progress bar"
    )
    add(
        "--mesh",
        "device mesh as AXIS=SIZE,... over data, expert, tensor (unnamed axes are 1)",
        "every device on data",
    )
    p.add_argument(
        "--no-zero1",
        dest="zero1",
        action="store_const",
        const=False,
        help="replicate the optimizer state over the data axis instead of partitioning it (ZeRO-1)",
    )
    _distributed_flags(p)
    return p


def _distributed_flags(p):
    g = p.add_argument_group(
        "multi-host (one process per host; or set MUONJAX_COORDINATOR, MUONJAX_NUM_PROCESSES, "
        "MUONJAX_PROCESS_ID)"
    )
    g.add_argument(
        "--coordinator",
        default=os.environ.get("MUONJAX_COORDINATOR"),
        help="HOST:PORT of process 0",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("MUONJAX_NUM_PROCESSES"),
        help="number of processes",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=_env_int("MUONJAX_PROCESS_ID"),
        help="this process's index",
    )


def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def _start_jax(args, cpu_devices):
    """Settings that must precede the backend: device count, then the cluster."""
    import jax

    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise ConfigError("--coordinator needs --num-processes and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            raise ConfigError(
                f"--process-id {args.process_id} is not in [0, --num-processes {args.num_processes})"
            )
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def _inspect_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="compile a train step from shapes alone and report its per-device costs",
        description="Compile the train step of --preset on a simulated CPU mesh from abstract shapes "
        "(nothing is allocated, so moonlight-16b-a3b on 64 devices is fine) and print, per device: "
        "parameter, optimizer-state and peak memory bytes; FLOPs of the step and of the optimizer "
        "update; bytes sent by each kind of collective.",
    )
    p.add_argument("--preset", default="small", help="model preset (default: small)")
    p.add_argument("--optimizer", default="muon", help="muon | adamw (default: muon)")
    p.add_argument(
        "--mesh", default="data=8", help="AXIS=SIZE,... over data, expert, tensor (default: data=8)"
    )
    p.add_argument(
        "--batch-size", type=int, help="global batch in sequences (default: data x expert)"
    )
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument(
        "--no-zero1", dest="zero1", action="store_false", help="replicate optimizer state over data"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _inspect(args) -> int:
    from muonjax.parallel.mesh import parse_mesh

    sizes = parse_mesh(args.mesh)
    import jax  # simulate the mesh's devices on the CPU, before the backend starts

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", math.prod(sizes.values()))
    from muonjax.parallel.mesh import make_mesh
    from muonjax.train.inspect import inspect

    batch = args.batch_size or sizes["data"] * sizes["expert"]
    config = TrainConfig(
        preset=args.preset,
        optimizer=args.optimizer,
        batch_size=batch,
        seq_len=args.seq_len,
        mesh=args.mesh,
        zero1=args.zero1,
    )
    report = inspect(config, make_mesh(sizes))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {_human(v)}" for k, v in value.items())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = _human(value)
            print(f"{key:44s} {value}")
    return 0


def _human(x) -> str:
    if isinstance(x, float) or abs(x) >= 10_000:
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(x) >= scale:
                return f"{x / scale:.3f}{unit}"
        return f"{x:.3g}"
    return str(x)


def _config_from_args(args) -> tuple[TrainConfig, bool]:
    runtime = ("command", "resume", "coordinator", "num_processes", "process_id")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in runtime}
    if "data" in given:
        given["data"] = tuple(given["data"])
    if args.resume:
        saved_path = pathlib.Path(given.get("out", TrainConfig.out)) / "config.json"
        if saved_path.exists():
            saved = TrainConfig.from_json(json.loads(saved_path.read_text())["train"])
            return saved.replace(**given), True
    return TrainConfig(**given), args.resume


def main(argv=None) -> int:
    parser = _Parser(prog="muonjax", description="Muon for JAX: train and inspect MoE models.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(subparsers)
    _inspect_parser(subparsers)
    try:
        args = parser.parse_args(argv)
        if args.command == "inspect":
            return _inspect(args)
        config, resume = _config_from_args(args)
        _start_jax(args, config.cpu_devices)
        from muonjax.train.loop import TrainingStopped, train

        try:
            summary = train(config, resume=resume)
        except TrainingStopped as e:
            print(f"muonjax train: {e}", file=sys.stderr)
            return 1
    except (ConfigError, MeshError) as e:
        print(f"muonjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
