"""The `muonjax` command line. Bad input: one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import sys

import jax

# The train extra's top-level modules, and the pip name of each where it differs.
TRAIN_EXTRA = {
    "flax": "flax",
    "orbax": "orbax-checkpoint",
    "grain": "grain",
    "chex": "chex",
    "tensorboardX": "tensorboardX",
    "tqdm": "tqdm",
    "tokenizers": "tokenizers",
    "tiktoken": "tiktoken",
    "safetensors": "safetensors",
}


def _missing_train_package(error: ModuleNotFoundError) -> str | None:
    """The train extra's package that `error` says is missing, or None if it is another module."""
    return TRAIN_EXTRA.get((error.name or "").partition(".")[0])


try:  # the core install (`pip install muonjax`) is the optimizer alone: main() says so
    from muonjax.models.generate import DEFAULT_MAX_LEN, MAX_SEED, generate, sampling_errors
    from muonjax.models.memory import is_out_of_memory
    from muonjax.parallel.cluster import ClusterError, simulate_cpu_devices, start
    from muonjax.parallel.mesh import MeshError, parse_mesh, run_mesh
    from muonjax.parallel.tpu import TPUError, parse_slice, skip_absent_tpu, slice_devices
    from muonjax.train import convert
    from muonjax.train.config import MAX_CPU_DEVICES, TOKENIZATION_FIELDS, TrainConfig
    from muonjax.train.costs import on_chip, step_costs
    from muonjax.train.errors import EXIT_PREEMPTED, ConfigError, WriteFailed
    from muonjax.train.flags import add_arguments, given_fields, resolve
    from muonjax.train.loop import Preempted, TrainingStopped, run
    from muonjax.train.preemption import ends_at_once
    from muonjax.train.shards import SHARD_TOKENS, write_shards
except ModuleNotFoundError as e:
    if _missing_train_package(e) is None:
        raise
    _MISSING = _missing_train_package(e)
else:
    _MISSING = None

EXIT_DIVERGED = 1  # too many non-finite steps in a row: see --resume-from
EXIT_USAGE = 2
EXIT_IO = 74  # sysexits' EX_IOERR: the run's files could not be written (disk full)
EXIT_INTERRUPTED = 130  # SIGINT before training set up its handler: nothing to save yet


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model",
        description="Train a Moonlight-style MoE language model with Muon (the Moonlight recipe) "
        "or AdamW. Outputs in --out: config.json, metrics.jsonl, tensorboard/, checkpoints/. "
        f"Exit codes: 0 done, {EXIT_DIVERGED} stopped by divergence (see --resume-from), "
        f"{EXIT_USAGE} bad input, {EXIT_IO} its files could not be written (disk full), "
        f"{EXIT_PREEMPTED} stopped by SIGTERM/SIGINT after checkpointing, or at once while it "
        "set up, with nothing to save (relaunch with --resume or --resume-if-exists).",
    )
    add_arguments(p)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete checkpoint; flags not given keep the run's values",
    )
    resume.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="--resume when --out holds a run, else start it: a scheduler can relaunch the same command",
    )
    resume.add_argument(
        "--resume-from",
        type=int,
        metavar="STEP",
        help="--resume from checkpoint STEP, not the newest (the newer ones are set aside, "
        "never deleted): with --skip-batches and a lower --learning-rate, the way past a divergence",
    )
    p.add_argument(
        "--skip-batches",
        type=int,
        default=0,
        metavar="N",
        help="on resume, skip the next N training batches (those that diverged), at most one "
        "pass over the training data; recorded in config.json's history",
    )
    _distributed_flags(p)
    return p


def _distributed_flags(p):
    g = p.add_argument_group(
        "multi-host (one process per host). Under SLURM (srun), Open MPI (mpirun), a Cloud TPU "
        "pod or Kubernetes the processes find each other as jax.distributed.initialize() does; "
        "elsewhere give all three flags (or MUONJAX_COORDINATOR, MUONJAX_NUM_PROCESSES, "
        "MUONJAX_PROCESS_ID), which also win over the cluster's"
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
    if cpu_devices is not None:
        simulate_cpu_devices(cpu_devices)
    joined = start(args.coordinator, args.num_processes, args.process_id)
    if joined is not None and joined.process_index == 0:
        print(f"muonjax: {joined.summary_line()}", flush=True)


INSPECT_DEFAULTS = {"preset": "small", "seq_len": 1024, "mesh": "data=8"}


def _inspect_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="compile a train step from shapes alone and report its per-device costs",
        description="Compile the train step that `muonjax train` would run, from abstract shapes "
        "(nothing is allocated, so moonlight-16b-a3b on 64 devices is fine), and print, per "
        "device: parameter, optimizer-state and peak memory bytes; FLOPs of the step and of "
        "the optimizer update; bytes sent by each kind of collective. The mesh is simulated "
        "with CPU devices, or with --tpu the TPU compiler compiles it for a TPU slice's chips "
        "on this machine (needs libtpu: pip install 'muonjax[tpu]'), and the report adds the "
        "chip's HBM, whether the step fits, and a roofline estimate of its time. Takes "
        "train's flags; --batch-size defaults to data x expert x --grad-accum.",
    )
    add_arguments(p, defaults=INSPECT_DEFAULTS)
    p.add_argument(
        "--tpu",
        metavar="SLICE",
        help="compile for this TPU slice: v5p-64, v5e-256, v6e-64 (Cloud TPU's names) or "
        "v5p:4x4x4 (the chip grid); --mesh defaults to data=CHIPS",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _inspect(args) -> int:
    given = given_fields(args)
    jax.config.update("jax_platforms", "cpu")  # the host compiles; nothing runs
    if args.tpu:
        # a compile-only TPU client cannot load executables back from a cache
        jax.config.update("jax_enable_compilation_cache", False)
        tpu = parse_slice(args.tpu)
        sizes = parse_mesh(given.setdefault("mesh", f"data={tpu.chips}"))
        devices = slice_devices(tpu)
    else:
        tpu, devices = None, None
        sizes = parse_mesh(given.get("mesh", INSPECT_DEFAULTS["mesh"]))
        if math.prod(sizes.values()) > MAX_CPU_DEVICES:  # one simulated CPU device each
            raise ConfigError(
                f"--mesh {given.get('mesh')}: {math.prod(sizes.values())} devices; "
                f"inspect simulates at most {MAX_CPU_DEVICES}"
            )
        simulate_cpu_devices(math.prod(sizes.values()))
    batch = sizes["data"] * sizes["expert"] * given.get("grad_accum", 1)
    config = TrainConfig(**{**INSPECT_DEFAULTS, "batch_size": batch, **given})
    report = step_costs(
        config, run_mesh(config.mesh, config.batch_size, config.grad_accum, devices)
    )
    if tpu is not None:
        report = {**report, **on_chip(report, tpu)}
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


def _tokenize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tokenize",
        help="tokenize a corpus once into ArrayRecord shards, for train --data DIR",
        description="Read and tokenize a corpus once, as `muonjax train` would (the same "
        "split, tokenizer and order), and write its training and validation token streams as "
        "ArrayRecord shards with a manifest.json (and the BPE's tokenizer.json) in --out. "
        "`muonjax train --data DIR` then reads only the windows each process trains on, "
        "after verifying the shards against the manifest. --out is written whole or not at "
        f"all. Exit codes: 0 done, {EXIT_USAGE} bad input, {EXIT_IO} the shards could not be "
        "written (disk full), 130 / 143 stopped by SIGINT / SIGTERM (nothing written).",
    )
    add_arguments(p, fields=("data", "corpus", *TOKENIZATION_FIELDS))  # makes the token streams
    p.add_argument("--out", required=True, help="the folder to write; must not exist")
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=SHARD_TOKENS,
        help=f"tokens per shard file (default: {SHARD_TOKENS})",
    )
    return p


def _tokenize(args) -> int:
    config = TrainConfig(**given_fields(args))
    _check_out_writable(args.out)  # before the work: a dangling link fails only at the rename
    with ends_at_once("muonjax tokenize", args.out):
        try:
            manifest = write_shards(config, args.out, shard_tokens=args.shard_tokens)
        except WriteFailed as e:
            print(e, file=sys.stderr)
            return EXIT_IO
    splits = manifest["splits"]
    print(json.dumps({"out": args.out, **{s: splits[s]["tokens"] for s in splits}}))
    return 0


def _convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="a Hugging Face DeepseekV3 checkpoint (e.g. Moonlight) to a run, or a run to one",
        description="--from-hf DIR --out RUN: a run directory whose step-0 checkpoint holds the "
        "checkpoint's weights (with a fresh optimizer state, and its tokenizer), which train "
        "--resume / --init-from and generate accept. --to-hf RUN --out DIR: the run's newest "
        "checkpoint that restores (or --step) as config.json + safetensors shards + index that "
        "transformers' DeepseekV3ForCausalLM loads, with the run's tokenizer files; the run is "
        "only read (it may be training): a newer checkpoint that does not restore is named in a "
        "warning line and left as it is. --out is written whole or not at all: into a partial "
        "folder next to it, renamed when complete, removed on an error or a signal (one a kill "
        "-9 leaves is removed by the next convert to that --out). Exit codes: 0 done, "
        f"{EXIT_USAGE} bad input, {EXIT_IO} --out could not be written, 130 / 143 stopped by "
        "SIGINT / SIGTERM (nothing written).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face checkpoint directory")
    source.add_argument("--to-hf", metavar="RUN", help="a muonjax run directory")
    p.add_argument("--out", required=True, help="the directory to write; must not exist")
    p.add_argument("--step", type=int, help="with --to-hf: this checkpoint, not the newest")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="with --to-hf: the tensors' type (float32, default: exact; bfloat16: rounded, "
        "half the size, as Moonlight ships)",
    )
    p.add_argument("--optimizer", help="with --from-hf: the run's optimizer (as train's flag)")
    p.add_argument(
        "--data",
        nargs="+",
        help="with --from-hf: the run's text, which a later --resume trains on (as train's flag; "
        "default: the default corpus)",
    )
    return p


def _convert(args) -> int:
    out = pathlib.Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; convert writes a new directory")
    _check_out_writable(args.out)
    if args.from_hf and args.step is not None:
        raise ConfigError("--step goes with --to-hf (a Hugging Face checkpoint has one)")
    if args.to_hf and (args.optimizer or args.data):
        raise ConfigError("--optimizer and --data go with --from-hf (they set up the run)")
    if args.from_hf:  # the checkpoint and flags checked before anything is written
        flags = {"optimizer": args.optimizer, "data": tuple(args.data or ())}
        config = convert.hf_to_run_config(
            args.from_hf, out, **{k: v for k, v in flags.items() if v}
        )
    try:
        # into a partial folder, renamed to --out when complete; removed on an error
        # or a signal (which ends the process at once)
        with convert.written_whole(out) as work:
            if args.to_hf:
                warn = lambda line: print(line, file=sys.stderr)
                convert.run_to_hf(args.to_hf, work, dtype=args.dtype, step=args.step, log=warn)
            else:
                named = lambda line: print(line.replace(str(work), str(out)))  # --out, not work
                run(config.replace(out=str(work)), log=named)
                convert.record_out(work, out)
    except (WriteFailed, OSError) as e:  # disk full, say: nothing was kept
        print(f"muonjax convert: writing {out} failed: {e}", file=sys.stderr)
        return EXIT_IO
    print(json.dumps({"out": str(out), **({"dtype": args.dtype} if args.to_hf else {"step": 0})}))
    return 0


def _generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="continue prompts with a run's (or a Hugging Face checkpoint's) model",
        description="Load the newest checkpoint of a run that restores (or --step), or a "
        "Hugging Face checkpoint directory, and continue each --prompt with a KV cache (MLA "
        "caches its compressed latent). Prints one JSON line per prompt. Reads the run only "
        "(it may be training): a newer checkpoint that does not restore is named in a warning "
        "line and left as it is.",
    )
    p.add_argument("--run", required=True, help="a run directory or a Hugging Face checkpoint")
    p.add_argument("--prompt", action="append", required=True, help="text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at least 1 (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default), or more")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}")
    p.add_argument("--step", type=int, help="this checkpoint of the run, not the newest")
    p.add_argument(
        "--max-len",
        type=int,
        help="the longest prompt (in tokens) + --max-new-tokens allowed (default: a Hugging "
        f"Face checkpoint's max_position_embeddings, else {DEFAULT_MAX_LEN}); the KV cache and "
        "the prefill it needs must also fit in the device's memory, checked before compiling",
    )
    return p


def _generate(args) -> int:
    flag = lambda name: f"--{name.replace('_', '-')} "
    errors = sampling_errors(args.max_new_tokens, args.temperature, args.top_p, args.seed, flag)
    if errors:  # before anything is read
        raise ConfigError("Cannot generate: " + "; ".join(errors))
    source = convert.model_source(args.run)
    tokenizer = convert.load_tokenizer(source)
    prompts = convert.encode_prompts(tokenizer, args.prompt, source)
    max_len = source.max_len if args.max_len is None else args.max_len
    convert.check_generation(source, prompts, args.max_new_tokens, max_len, flag)  # before loading
    with ends_at_once("muonjax generate"):
        warn = lambda line: print(line, file=sys.stderr)
        model = convert.load_model(source, step=args.step, log=warn)
        try:
            outputs = generate(
                model,
                prompts,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                eos_id=tokenizer.end_id,
                max_len=max_len,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        except jax.errors.JaxRuntimeError as e:
            if not is_out_of_memory(e):
                raise
            raise ConfigError(
                f"generating does not fit in the device's memory ({str(e).splitlines()[0][:300]}):"
                " lower --max-new-tokens, the prompts' length or their number"
            ) from None
    for text, ids in zip(args.prompt, outputs):
        line = {"prompt": text, "completion": tokenizer.decode(ids), "tokens": len(ids)}
        print(json.dumps(line, ensure_ascii=False))
    return 0


def _human(x) -> str:
    if isinstance(x, float) or abs(x) >= 10_000:
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(x) >= scale:
                return f"{x / scale:.3f}{unit}"
        return f"{x:.3g}"
    return str(x)


def _train(args) -> int:
    """`muonjax train`: the run's config resolved from the flags (flags.resolve), checked
    before JAX starts, then trained; its summary printed as one JSON line."""
    resume = args.resume or args.resume_from is not None or args.skip_batches != 0
    config, resume = resolve(
        given_fields(args), resume=resume, resume_if_exists=args.resume_if_exists
    )
    if config.mesh:  # its syntax, before JAX starts; its size is checked against the devices
        parse_mesh(config.mesh)
    _check_out_writable(config.out)
    _start_jax(args, config.cpu_devices)
    try:
        summary = run(
            config, resume=resume, resume_from=args.resume_from, skip_batches=args.skip_batches
        )
    except (TrainingStopped, Preempted, WriteFailed) as e:
        print(f"muonjax train: {e}", file=sys.stderr)
        codes = {TrainingStopped: EXIT_DIVERGED, Preempted: EXIT_PREEMPTED}
        return codes.get(type(e), EXIT_IO)
    finally:  # run() has saved what it had: a signal while the process exits changes nothing
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
    print(json.dumps(summary.to_json()))
    return 0


def _check_out_writable(out: str) -> None:
    """--out can be created (or, when it exists, written to): checked before anything is
    written or JAX starts, without creating anything."""
    path = pathlib.Path(out)
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # exists() follows links: this one points nowhere
            raise ConfigError(
                f"--out {out}: {probe} is a symbolic link to {os.readlink(probe)}, which does "
                "not exist"
            )
        if probe.parent == probe:
            break
        probe = probe.parent
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is not a directory")
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {probe} is not writable (permission denied or read-only)")


def _no_train_extra(package: str) -> int:
    print(
        f"muonjax: the command line needs the training extra (missing: {package}); "
        "install it with: pip install 'muonjax[train]'",
        file=sys.stderr,
    )
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="muonjax",
        description="Muon for JAX: train and inspect MoE models, tokenize data, convert "
        "Hugging Face checkpoints, generate text.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(subparsers)
    _inspect_parser(subparsers)
    _tokenize_parser(subparsers)
    _convert_parser(subparsers)
    _generate_parser(subparsers)
    return parser


# each command's function: its parsed arguments -> the exit code
COMMANDS = {
    "train": _train,
    "inspect": _inspect,
    "tokenize": _tokenize,
    "convert": _convert,
    "generate": _generate,
}


def main(argv=None) -> int:
    if _MISSING is not None:
        return _no_train_extra(_MISSING)
    skip_absent_tpu()
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except (ConfigError, MeshError, ClusterError, TPUError) as e:
        print(f"muonjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before run() handles signals: nothing trained, nothing to save
        print("muonjax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as e:  # one the train extra imports only when it runs
        if _missing_train_package(e) is None:
            raise
        return _no_train_extra(_missing_train_package(e))


if __name__ == "__main__":
    sys.exit(main())
