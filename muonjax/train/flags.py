"""A run's command-line flags: one per TrainConfig field (argparse from the
fields' metadata), --model overrides, and the one resolution of the flags given
into the run's config (`resolve`): on --resume the saved run's config with the
flags on top; otherwise what is not given taken from the --init-from run or
checkpoint and from a shards folder, then the defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import typing

from muonjax.train.config import FREE_MODEL_FIELDS, TrainConfig, field_type, flag_name
from muonjax.train.errors import ConfigError
from muonjax.train.finetune import inherit_from_source
from muonjax.train.rundir import CONFIG_FILE, read_run_config
from muonjax.train.shards import inherit_from_shards


def resolve(
    given: dict,
    *,
    resume: bool = False,
    resume_if_exists: bool = False,
    base: TrainConfig | None = None,
) -> tuple[TrainConfig, bool]:
    """(the run's config, whether to resume it) from the TrainConfig fields given
    as flags (`given_fields`). A resumed run (`resume`, or `resume_if_exists` and
    --out holds a run) whose config.json exists: the saved config with `given` on
    top. Otherwise `base` (default: the defaults) with `given` on top, where the
    --init-from source (finetune.inherit_from_source) and the shards
    (shards.inherit_from_shards) fill in what is not given."""
    saved_path = pathlib.Path(given.get("out", (base or TrainConfig).out)) / CONFIG_FILE
    resume = resume or (resume_if_exists and saved_path.exists())
    if resume and saved_path.exists():
        saved = TrainConfig.from_json(read_run_config(saved_path.parent)["train"])
        return saved.replace(**given), True
    fields = inherit_from_shards(inherit_from_source(given))
    return (base or TrainConfig()).replace(**fields), resume


def config_from_args(argv: list[str], base: TrainConfig | None = None) -> TrainConfig:
    """The config the same words give on the command line (`muonjax train ARGS`),
    on top of `base` (default: the defaults)."""
    parser = argparse.ArgumentParser(prog="config_from_args", exit_on_error=False)
    add_arguments(parser)
    try:
        args, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(str(e)) from None
    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    return resolve(given_fields(args), base=base)[0]


def add_arguments(
    parser: argparse.ArgumentParser, defaults: dict | None = None, fields: tuple[str, ...] = ()
) -> None:
    """One flag per TrainConfig field (or per one of `fields`), help and defaults
    from the field (or from `defaults`, for a command whose defaults differ).
    Every default is SUPPRESS, so that the parsed namespace holds only the flags given."""
    for f in dataclasses.fields(TrainConfig):
        if fields and f.name not in fields:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        help_text = f.metadata["help"]
        if default not in (None, (), {}):  # the others say their default in words
            help_text += f" (default: {default})"
        kw = dict(help=help_text.replace("%", "%%"), default=argparse.SUPPRESS, dest=f.name)
        if f.metadata.get("choices"):  # checked by TrainConfig, in its own words
            kw["metavar"] = "|".join(f.metadata["choices"])
        kind = field_type(f.name)
        if f.name == "remat":  # --remat POLICY; --remat alone is full, --no-remat none
            parser.add_argument(flag_name(f), nargs="?", const="full", **kw)
            parser.add_argument(
                "--no-remat",
                dest=f.name,
                action="store_const",
                const="none",
                default=argparse.SUPPRESS,
                help="the same as --remat none",
            )
        elif kind is bool:
            parser.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "model":
            parser.add_argument(flag_name(f), type=str, metavar="KEY=VALUE,...", **kw)
            parser.add_argument(
                "--model-config",
                dest="model_config",
                default=argparse.SUPPRESS,
                metavar="FILE.json",
                help="ModelConfig fields from a JSON object (a run's config.json 'model' works); "
                "--model overrides it",
            )
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag_name(f), nargs="+", **kw)
        else:
            parser.add_argument(flag_name(f), type=kind, **kw)


def given_fields(args: argparse.Namespace) -> dict:
    """The TrainConfig fields a parsed namespace sets (--model and --model-config merged)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "model" in given or hasattr(args, "model_config"):
        model = load_model_file(args.model_config) if hasattr(args, "model_config") else {}
        model.update(parse_model_overrides(given.get("model", "")))
        given["model"] = model
    return given


def parse_model_overrides(text: str) -> dict:
    """'d_model=384,n_layers=6' -> {'d_model': '384', 'n_layers': '6'} (typed later)."""
    overrides = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model expects KEY=VALUE,..., got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def load_model_file(path: str) -> dict:
    """--model-config FILE.json: an object of ModelConfig fields."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--model-config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--model-config {path} is not JSON ({e.msg} at line {e.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--model-config {path} must hold a JSON object of ModelConfig fields")
    # a saved config.json's "model" works too: the tokenizer sets the vocabulary, and
    # --dtype, --remat and --moe-dispatch are flags of their own (default: the preset's)
    return {k: v for k, v in data.items() if k not in FREE_MODEL_FIELDS | {"vocab_size"}}
