"""The `muonjax` command line. Bad input: one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

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
    return p


def _config_from_args(args) -> tuple[TrainConfig, bool]:
    given = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("command", "resume")
    }
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
    try:
        args = parser.parse_args(argv)
        config, resume = _config_from_args(args)
        if config.cpu_devices is not None:
            import jax  # before anything starts the backend

            jax.config.update("jax_num_cpu_devices", config.cpu_devices)
        from muonjax.train.loop import TrainingStopped, train

        try:
            summary = train(config, resume=resume)
        except TrainingStopped as e:
            print(f"muonjax train: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"muonjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
