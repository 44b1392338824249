"""TrainConfig: one source for flags, defaults and help; model overrides;
optimizer and schedule tables; old run directories."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import muonjax
from muonjax.models import PRESETS
from muonjax.train import ConfigError, TrainConfig
from muonjax.train.flags import add_arguments, config_from_args
from muonjax.train.optimizers import OPTIMIZERS, SCHEDULES, learning_rate_schedule, make_optimizer


def test_from_args_takes_the_cli_words_and_defaults_come_from_the_fields():
    assert config_from_args([]) == TrainConfig()
    config = config_from_args(
        [
            "--preset",
            "small",
            "--model",
            "d_model=384,n_layers=6,n_routed_experts=32",
            "--no-nesterov",
            "--ns-coeffs",
            "polar_express",
            "--update-scale",
            "update_norm",
            "--schedule",
            "wsd",
            "--grad-accum",
            "4",
            "--dtype",
            "bfloat16",
            "--no-decay-norms",
            "--moe-dispatch",
            "ragged_dot",
            "--data",
            "a.txt",
            "b/",
        ]  # fmt: skip
    )
    assert config.model == {"d_model": 384, "n_layers": 6, "n_routed_experts": 32}
    assert (config.nesterov, config.ns_coeffs, config.update_scale) == (
        False,
        "polar_express",
        "update_norm",
    )
    assert (config.schedule, config.grad_accum, config.dtype, config.decay_norms) == (
        "wsd",
        4,
        "bfloat16",
        False,
    )
    assert config.data == ("a.txt", "b/")
    model = config.model_config(vocab_size=300)
    assert (model.d_model, model.n_layers, model.n_routed_experts, model.vocab_size) == (
        384,
        6,
        32,
        300,
    )
    assert model.dtype == "bfloat16" and model.n_heads == PRESETS["small"].n_heads
    assert (
        model.moe_dispatch == "ragged_dot" and TrainConfig().model_config().moe_dispatch == "auto"
    )
    # --help shows every field, with the field's own default
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
    assert "(default: 0.95)" in help_text and "(default: 1e-08)" in help_text


def test_model_config_file_and_overrides(tmp_path):
    path = tmp_path / "model.json"
    saved = {"d_model": 96, "n_heads": 2, "vocab_size": 999, "dtype": "bfloat16", "remat": True,
             "moe_dispatch": "blocks"}  # fmt: skip
    path.write_text(json.dumps(saved))
    config = config_from_args(["--model-config", str(path), "--model", "n_heads=3"])
    assert config.model == {"d_model": 96, "n_heads": 3}  # the tokenizer sets vocab_size


def test_remat_flag_takes_a_policy():
    """--remat POLICY; --remat alone is full and --no-remat none, as when it was a bool."""
    assert config_from_args([]).remat is None  # the preset's
    assert config_from_args(["--remat"]).remat == "full"
    assert config_from_args(["--remat", "--steps", "3"]).remat == "full"
    assert config_from_args(["--no-remat"]).remat == "none"
    for policy in ("none", "dots", "full"):
        config = config_from_args(["--remat", policy])
        assert config.remat == policy and config.model_config().remat == policy
    assert config_from_args(["--preset", "moonlight-16b-a3b"]).model_config().remat == "full"
    assert TrainConfig(remat=True).remat == "full" and TrainConfig(remat=False).remat == "none"
    saved = {**TrainConfig().to_json(), "remat": True}  # a config.json from before the policies
    assert TrainConfig.from_json(saved) == TrainConfig(remat="full")
    with pytest.raises(ConfigError, match=r"--remat 'dot' is unknown \(valid: none, dots, full\)"):
        config_from_args(["--remat", "dot"])


def test_model_vocabulary_is_the_tokenizers_or_larger():
    """A checkpoint's vocabulary may be padded past its tokenizer's ids; never smaller."""
    assert TrainConfig().model_config(vocab_size=300).vocab_size == 300
    padded = config_from_args(["--model", "vocab_size=512"])
    assert padded.model_config(vocab_size=300).vocab_size == 512
    small = config_from_args(["--model", "vocab_size=9"])
    with pytest.raises(ConfigError, match="vocab_size=9 is smaller than the tokenizer's"):
        small.model_config(vocab_size=300)


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["--model", "hidden=3"],
            "--model: unknown key hidden (valid: vocab_size, d_model, n_layers,",
        ),
        (["--model", "d_model=wide"], "--model d_model=wide: expected int"),
        (["--model", "moe_dispatch=blocks"], "--model: unknown key moe_dispatch"),  # a flag
        (["--moe-dispatch", "dense"], "--moe-dispatch 'dense' is unknown (valid: auto, blocks,"),
        (
            ["--model", "experts_per_token=99"],
            "experts_per_token=99 (valid: 1..n_routed_experts=8)",
        ),
        (["--model", "d_model"], "--model expects KEY=VALUE,..., got 'd_model'"),
        (["--model", "kv_lora_rank=0"], "--model: Invalid ModelConfig: kv_lora_rank=0 (must be"),
        (["--learning-rate", "inf"], "--learning-rate must be positive and finite, got inf"),
        (["--weight-decay", "nan"], "--weight-decay must be >= 0 and finite, got nan"),
        (["--momentum", "1.5"], "--momentum must be in [0, 1], got 1.5"),
        (
            ["--update-scale", "norm"],
            "--update-scale 'norm' is unknown (valid: moonlight, hidden, update_norm, jordan)",
        ),
        (["--schedule", "linear"], "--schedule 'linear' is unknown (valid: cosine, wsd, constant)"),
        (
            ["--batch-size", "12", "--grad-accum", "5"],
            "--batch-size 12 is not divisible by --grad-accum 5",
        ),
        (["--init-optimizer-state"], "--init-optimizer-state needs --init-from"),
    ],
)
def test_bad_values_name_what_is_valid(args, match):
    with pytest.raises(ConfigError, match=None) as error:
        config_from_args(args)
    assert match in str(error.value)


def test_old_config_json_loads_with_the_new_fields_defaulted():
    old = {k: v for k, v in TrainConfig().to_json().items() if k in {
        "out", "preset", "optimizer", "steps", "batch_size", "seq_len", "learning_rate",
        "warmup_steps", "decay_steps", "weight_decay", "seed", "data", "tokenizer"}}  # fmt: skip
    # holdout: the split a run had before the field existed (config.SAVED_BEFORE)
    assert TrainConfig.from_json(old) == TrainConfig(**{**old, "data": (), "holdout": "tail"})


def test_schedules_have_their_shapes():
    base = TrainConfig(learning_rate=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1)
    at = lambda config, steps: [float(learning_rate_schedule(config)(s)) for s in steps]
    for name in SCHEDULES:  # every schedule warms up linearly from 0
        assert at(base.replace(schedule=name), [0, 5, 10]) == pytest.approx([0, 0.5, 1.0])
    cosine = at(base, [55, 100, 150])
    assert cosine == pytest.approx([0.55, 0.1, 0.1])  # halfway: (1 + 0.1) / 2; then the floor
    wsd = base.replace(schedule="wsd", decay_fraction=0.2)
    assert at(wsd, [11, 50, 80, 90, 100, 120]) == pytest.approx([1, 1, 1, 0.55, 0.1, 0.1])
    assert at(base.replace(schedule="constant"), [11, 99, 1000]) == pytest.approx([1, 1, 1])
    assert at(wsd.replace(warmup_steps=0), [0]) == pytest.approx([1.0])
    # decay_steps fixes the horizon so that a run can be extended on the same schedule
    assert at(wsd.replace(decay_steps=200), [100, 180]) == pytest.approx([1.0, 0.1 + 0.9 * 0.5])


def test_every_knob_reaches_the_optimizer():
    params = {
        "embed": {"embedding": jax.random.normal(jax.random.key(0), (32, 16))},
        "layers": {
            "w": jax.random.normal(jax.random.key(1), (2, 16, 48)),
            "scale": jnp.ones((2, 16)),
        },  # fmt: skip
    }
    grads = jax.tree.map(lambda p: jnp.sin(3 * p) + 0.1, params)
    config = TrainConfig(
        learning_rate=0.05, weight_decay=0.2, weight_decay_adamw=0.05, decay_norms=False,
        rms_scale=0.3, update_scale="hidden", momentum=0.9, nesterov=False, ns_steps=3,
        ns_dtype="bfloat16", adam_b1=0.8, adam_b2=0.99, adam_eps=1e-6, schedule="constant",
        warmup_steps=0,
    )  # fmt: skip
    direct = muonjax.moonlight(
        0.05, weight_decay=0.2, adamw_weight_decay=0.05, decay_norms_and_biases=False,
        rms_scale=0.3, update_scale="hidden", hidden_size=16, momentum=0.9, nesterov=False,
        ns_steps=3, compute_dtype="bfloat16", adam_b1=0.8, adam_b2=0.99, adam_eps=1e-6,
    )  # fmt: skip
    for cfg, expected in [(config, direct), (config.replace(optimizer="adamw"), None)]:
        tx = make_optimizer(cfg, hidden_size=16)
        got, _ = tx.update(grads, tx.init(params), params)
        if expected is None:
            expected = muonjax.optim.recipes.optax.adamw(
                0.05, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.2,
                mask=muonjax.weight_decay_mask,
            )  # fmt: skip
        want, _ = expected.update(grads, expected.init(params), params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    assert set(OPTIMIZERS) == {"muon", "adamw"}
