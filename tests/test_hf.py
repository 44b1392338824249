"""Hugging Face DeepseekV3 checkpoints: loading against transformers' own logits,
exporting bit-exactly, placing on a mesh, and failing loudly on what muonjax
cannot express. The fixtures in tests/data/hf are tiny random checkpoints of
Moonlight's structure written by transformers (tests/data/make_hf_fixture.py)."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from muonjax.models import ModelConfig, Transformer, abstract_model
from muonjax.models.hf import CheckpointError, from_hf, hf_config, to_hf
from muonjax.parallel import Plan, make_mesh

DATA = pathlib.Path(__file__).parent / "data" / "hf"
FIXTURES = ["deepseek_v3_tiny", "deepseek_v3_tiny_qlora"]


def _tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}
    return out


def _logits(model, directory):
    tokens = jnp.asarray(np.load(directory / "tokens.npy"), jnp.int32)
    return np.asarray(model(tokens)[0])


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_transformers(name):
    directory = DATA / name
    model = from_hf(directory)
    want = np.load(directory / "logits.npy")
    got = _logits(model, directory)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5
    bias = _tensors(directory)["model.layers.1.mlp.gate.e_score_correction_bias"]
    np.testing.assert_array_equal(model.moe_layers.moe.router.bias[...][0], bias)
    assert np.any(bias != 0)


def test_rotary_layout_is_converted(tmp_path):
    """Read as if not interleaved, the same weights give other logits: the
    permutation is what makes the match above."""
    directory = tmp_path / "ckpt"
    shutil.copytree(DATA / FIXTURES[0], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "rope_interleave": False}))
    want = np.load(directory / "logits.npy")
    got = _logits(from_hf(directory), directory)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) > 1e-3


@pytest.mark.parametrize("name", FIXTURES)
def test_export_round_trips_bit_exactly(name, tmp_path):
    directory = DATA / name
    model = from_hf(directory)
    out = to_hf(model, tmp_path / "export", max_shard_bytes=200_000)
    original, exported = _tensors(directory), _tensors(out)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in original.values())
    assert hf_config(out) == hf_config(directory)
    np.testing.assert_array_equal(_logits(from_hf(out), directory), _logits(model, directory))


def test_bfloat16_checkpoint_round_trips(tmp_path):
    """Moonlight ships bfloat16: loaded exactly into float32, written back to the bit."""
    source = tmp_path / "bf16"
    source.mkdir()
    shutil.copy(DATA / FIXTURES[1] / "config.json", source)
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(DATA / FIXTURES[1]).items()}
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    model = from_hf(source, dtype="bfloat16")
    assert model.lm_head.kernel[...].dtype == jnp.float32 and model.config.dtype == "bfloat16"
    exported = _tensors(to_hf(model, tmp_path / "out", dtype="bfloat16"))
    for key, value in tensors.items():
        assert exported[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(exported[key].view(np.uint16), value.view(np.uint16))


def test_placed_on_a_mesh_as_read():
    directory = DATA / FIXTURES[0]
    config = hf_config(directory)
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    shardings = Plan(mesh, nnx.state(abstract_model(config))).params
    sharded, local = from_hf(directory, shardings=shardings), from_hf(directory)
    pairs = zip(
        jax.tree.leaves(nnx.state(sharded)),
        jax.tree.leaves(nnx.state(local)),
        jax.tree.leaves(shardings),
        strict=True,
    )
    for got, want, sharding in pairs:
        assert got.sharding == sharding
        np.testing.assert_array_equal(got, want)
    experts = nnx.state(sharded)["moe_layers"]["moe"]["experts"]["gate"][...]
    assert experts.addressable_shards[0].data.shape[1] == config.n_routed_experts // 2


def _with_config(tmp_path, **changes) -> pathlib.Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(DATA / FIXTURES[0], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rotary scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rotary scaling"),
        ({"n_group": 4, "topk_group": 2}, "group-limited routing"),
        ({"tie_word_embeddings": True}, "tied input and output embeddings"),
        ({"attention_bias": True}, "attention projection biases"),
        ({"hidden_act": "gelu"}, "the MLP activation"),
        ({"scoring_func": "softmax"}, "scoring function"),
        ({"num_key_value_heads": 2}, "num_key_value_heads=2"),
        ({"model_type": "llama"}, "model_type 'llama'"),
    ],
)
def test_features_muonjax_lacks_fail_loudly(tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        from_hf(_with_config(tmp_path, **changes))


def _rewrite(directory: pathlib.Path, edit) -> None:
    """The fixture's tensors, edited, as one file."""
    tensors = _tensors(directory)
    edit(tensors)
    for file in directory.glob("model*.safetensors*"):
        file.unlink()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.pop("model.layers.2.mlp.experts.7.down_proj.weight"),
            "missing: model.layers.2",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(96, np.float32)}),
            "unexpected",
        ),
        (
            lambda t: t.update({"lm_head.weight": np.zeros((320, 32), np.float32)}),
            "wrong shape: lm_head",
        ),
    ],
)
def test_tensors_that_do_not_fit(tmp_path, edit, match):
    directory = _with_config(tmp_path)
    _rewrite(directory, edit)
    with pytest.raises(CheckpointError, match=match):
        from_hf(directory)


def test_multi_token_prediction_layers_are_skipped(tmp_path):
    """DeepSeek-V3 ships its MTP module as a layer past the last; transformers skips it."""
    directory = _with_config(tmp_path)
    _rewrite(
        directory,
        lambda t: t.update({"model.layers.3.eh_proj.weight": np.ones((2, 2), np.float32)}),
    )
    from_hf(directory)


def test_what_to_hf_cannot_write(tmp_path):
    mha = Transformer(ModelConfig(attention="mha", n_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="MLA only"):
        to_hf(mha, tmp_path / "a")
    model = from_hf(DATA / FIXTURES[0])
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        to_hf(model, tmp_path / "exists")
    with pytest.raises(CheckpointError, match="dtype"):
        to_hf(model, tmp_path / "b", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # nothing half-written


def test_moonlight_config_round_trips(tmp_path):
    """Moonlight-16B-A3B's config (the preset) written as config.json and read back:
    the same model, with the latent norms' eps DeepseekV3 uses."""
    from muonjax.models import preset
    from muonjax.models.hf import config_to_hf

    moonlight = preset("moonlight-16b-a3b")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(moonlight, "bfloat16")))
    read = hf_config(tmp_path)
    assert read == moonlight.replace(dtype="float32", remat=False)
    assert read.rms_norm_eps == 1e-5 and read.routed_scaling_factor == 2.446
