"""Hugging Face checkpoints as untrusted input: hostile variants of the fixtures in
tests/data/hf (files outside the folder, FIFOs, unloadable dtypes, damaged
safetensors, absurd or mistyped config.json values) are each one CheckpointError,
found before any work or memory depends on them; the Hugging Face cache's
symlinked layout still loads."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from muonjax.models import hf
from muonjax.models.hf import CheckpointError, from_hf, hf_config, is_hf_checkpoint
from muonjax.models.memory import TooLarge

ROOT = pathlib.Path(__file__).parent.parent
DATA = ROOT / "tests" / "data" / "hf"
SHARDED, SINGLE = DATA / "deepseek_v3_tiny", DATA / "deepseek_v3_tiny_qlora"
INDEX = "model.safetensors.index.json"
SHARD = "model-00002-of-00004.safetensors"


def _copy(tmp_path, source=SHARDED, **config_changes) -> pathlib.Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **config_changes}))
    return directory


def _logits_match(model, source) -> bool:
    tokens = jnp.asarray(np.load(source / "tokens.npy"), jnp.int32)
    want = np.load(source / "logits.npy")
    got = np.asarray(model(tokens)[0])
    return np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


# -- files outside the folder ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["../outside.safetensors", "absolute", "sub/" + SHARD, ".."])
def test_index_names_only_files_in_the_folder(tmp_path, monkeypatch, where):
    """A valid shard outside the folder, named by the index, is refused, not loaded."""
    directory = _copy(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(directory / SHARD, outside)
    (directory / "sub").mkdir()
    shutil.copy(outside, directory / "sub" / SHARD)
    name = str(outside) if where == "absolute" else where
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"] = {k: name if v == SHARD else v for k, v in index["weight_map"].items()}
    (directory / INDEX).write_text(json.dumps(index))
    opened = []
    record = lambda path, **kw: opened.append(path) or safe_open(path, **kw)
    monkeypatch.setattr(hf, "safe_open", record)
    with pytest.raises(CheckpointError, match="not plain file names") as error:
        from_hf(directory)
    assert repr(name) in str(error.value)
    assert opened == []


def test_hugging_face_cache_symlinks_load(tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<hash>: a symlink in the folder is followed."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "0123abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for k, file in enumerate(sorted(SHARDED.iterdir())):
        shutil.copy(file, blobs / f"blob{k}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{k}")
    assert is_hf_checkpoint(snapshot)
    assert _logits_match(from_hf(snapshot), SHARDED)


# -- files that are not regular -------------------------------------------------------------------


def _fifo_in_place_of(path: pathlib.Path) -> subprocess.Popen:
    """`path` made a FIFO, with a writer waiting on it: anything that opens it gets
    end-of-file instead of blocking forever (safe_open would block holding the GIL),
    and the writer prints "opened" when that happens."""
    path.unlink()
    os.mkfifo(path)
    script = 'exec 3>"$0"; echo opened'
    return subprocess.Popen(["sh", "-c", script, str(path)], stdout=subprocess.PIPE, text=True)


def _was_opened(writer: subprocess.Popen) -> bool:
    try:
        out, _ = writer.communicate(timeout=2)
    except subprocess.TimeoutExpired:  # nobody opened it: the writer still waits
        writer.kill()
        out, _ = writer.communicate()
    return "opened" in out


@pytest.mark.parametrize("name", [SHARD, "config.json", INDEX])
def test_fifo_is_refused_without_opening_it(tmp_path, name):
    directory = _copy(tmp_path)
    writer = _fifo_in_place_of(directory / name)
    try:
        looks_like_one = is_hf_checkpoint(directory)  # for from_hf to say what is wrong
        with pytest.raises(CheckpointError) as error:
            from_hf(directory)
    finally:
        assert not _was_opened(writer)
    assert looks_like_one
    assert f"{directory / name} is not a regular file (it is a FIFO)" in str(error.value)


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_other_non_regular_files_are_refused(tmp_path, kind):
    directory = _copy(tmp_path)
    (directory / SHARD).unlink()
    if kind == "directory":
        (directory / SHARD).mkdir()
    else:
        (directory / SHARD).symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=f"{SHARD} is not a regular file"):
        from_hf(directory)


def test_oversized_or_nested_config_json_is_one_error(tmp_path):
    directory = _copy(tmp_path)
    with open(directory / "config.json", "r+b") as f:
        f.truncate(hf.MAX_JSON_BYTES + 1)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="bytes, more than a checkpoint's JSON can be"):
        hf_config(directory)
    (directory / "config.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match="config.json: cannot read it"):
        hf_config(directory)


# -- dtypes and damaged safetensors ---------------------------------------------------------------


def _tensors(directory) -> dict[str, np.ndarray]:
    with safe_open(directory / "model.safetensors", framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _write_raw(path, tensors: dict[str, tuple[str, tuple, bytes]]) -> None:
    """A safetensors file of (dtype name, shape, bytes) per tensor, whatever the dtype."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        end = offset + len(data)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header).encode()
    data = b"".join(data for _, _, data in tensors.values())
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize(
    "dtype, numpy_dtype, count",
    [("F64", np.float64, 1), ("I8", np.int8, 1), ("F8_E4M3", np.uint8, 5), ("BOOL", np.bool_, 1)],
)
def test_unloadable_dtypes_are_refused_by_name(tmp_path, dtype, numpy_dtype, count):
    directory = _copy(tmp_path, SINGLE)
    tensors = _tensors(directory)
    changed = sorted(tensors)[:count]
    raw = {
        name: (dtype, v.shape, v.astype(numpy_dtype).tobytes()) if name in changed
        else ("F32", v.shape, v.tobytes())
        for name, v in tensors.items()
    }  # fmt: skip
    _write_raw(directory / "model.safetensors", raw)
    with pytest.raises(CheckpointError, match="loadable: F32, BF16, F16") as error:
        from_hf(directory)
    assert f"{changed[0]} ({dtype})" in str(error.value)
    assert ("and 2 more" in str(error.value)) == (count == 5)


def test_float16_is_loaded_exactly(tmp_path):
    directory = _copy(tmp_path, SINGLE)
    tensors = {k: v.astype(np.float16) for k, v in _tensors(directory).items()}
    save_file(tensors, str(directory / "model.safetensors"))
    model = from_hf(directory)
    np.testing.assert_array_equal(model.lm_head.kernel[...], tensors["lm_head.weight"].T)


def _damage(raw: bytes, how: str) -> bytes:
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    tensors = [n for n in header if n != "__metadata__"]
    by_offset = sorted(tensors, key=lambda n: header[n]["data_offsets"])
    if how == "truncated":
        return raw[:-100]
    if how == "header length 2**62":
        return (2**62).to_bytes(8, "little") + raw[8:]
    if how == "header not JSON":
        return raw[:8] + b"{" * length + raw[8 + length :]
    if how == "shorter than a header":
        return raw[:5]
    # the second tensor's bytes 4 into the first's, or the last's past the end
    shifts = {"overlapping offsets": (by_offset[1], -4), "offsets past the end": (by_offset[-1], 8)}
    if how in shifts:
        name, by = shifts[how]
        header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + raw[8 + length :]


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "header length 2**62",
        "header not JSON",
        "shorter than a header",
        "overlapping offsets",
        "offsets past the end",
    ],
)
def test_damaged_safetensors_is_one_error(tmp_path, how):
    directory = _copy(tmp_path, SINGLE)
    path = directory / "model.safetensors"
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(CheckpointError, match="not a (valid )?safetensors file") as error:
        from_hf(directory)
    assert str(error.value).startswith(f"{path}: ")


def test_index_naming_a_tensor_its_file_lacks(tmp_path):
    directory = _copy(tmp_path)
    index = json.loads((directory / INDEX).read_text())
    name = next(k for k, v in index["weight_map"].items() if v == SHARD)
    index["weight_map"][name] = "model-00001-of-00004.safetensors"
    (directory / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"model-00001-of-00004.safetensors lacks {name}"):
        from_hf(directory)


# -- config.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"n_group": "2"}, "n_group='2' (must be an integer >= 1)"),
        ({"kv_lora_rank": -4}, "kv_lora_rank=-4 (must be positive)"),
        ({"kv_lora_rank": 0}, "kv_lora_rank=0 (must be positive)"),
        ({"num_hidden_layers": "3"}, "num_hidden_layers='3' (must be an integer)"),
        ({"hidden_size": 64.0}, "hidden_size=64.0 (must be an integer)"),
        ({"n_routed_experts": True}, "n_routed_experts=True (must be an integer)"),
        ({"first_k_dense_replace": -1}, "first_k_dense_replace=-1 (must be an integer >= 0)"),
        ({"initializer_range": -0.1}, "initializer_range=-0.1 (must be >= 0 and finite)"),
        ({"rms_norm_eps": 0}, "rms_norm_eps=0 (must be positive and finite)"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob='yes' (must be true or false)"),
        ({"q_lora_rank": 0}, "q_lora_rank=0 (must be None or a positive integer)"),
        ({"rope_parameters": ["rope_theta"]}, "rope_parameters=['rope_theta'] (must be an object"),
        ({"rope_interleave": "no"}, "rope_interleave='no' (must be true or false)"),
    ],
)
def test_config_values_have_their_types_and_ranges(tmp_path, changes, match):
    directory = _copy(tmp_path, **changes)
    with pytest.raises(CheckpointError) as error:
        hf_config(directory)
    assert str(error.value).startswith(f"{directory / 'config.json'}: ")
    assert match in str(error.value)


_BOUNDED = """
import resource, sys
limit = 3 << 30  # JAX starts under ~1.5 GiB of address space
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from muonjax.models.hf import CheckpointTooLarge, from_hf
try:
    from_hf(sys.argv[1])
except CheckpointTooLarge as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.parametrize("key", ["num_hidden_layers", "n_routed_experts"])
def test_absurd_sizes_are_refused_before_allocating(tmp_path, key):
    """Under a 3 GiB address-space limit: one error, not minutes of work and a MemoryError."""
    directory = _copy(tmp_path, **{key: 10**9})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", _BOUNDED, str(directory)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 3, run.stderr[-2000:]
    assert run.stdout.startswith(f"{directory}: the model needs at least ")
    assert "float32 parameters" in run.stdout and "can hold" in run.stdout


def test_memory_check_can_be_skipped(monkeypatch):
    def too_large(config, devices, **kw):
        raise TooLarge("too large")

    monkeypatch.setattr(hf, "check_fits", too_large)
    with pytest.raises(CheckpointError, match="too large") as error:
        from_hf(SINGLE)
    assert isinstance(error.value, TooLarge)
    assert _logits_match(from_hf(SINGLE, check_memory=False), SINGLE)


def test_tensor_table_is_bounded_by_the_checkpoint(tmp_path):
    """A model that needs far more tensors than the checkpoint holds is refused after
    listing about as many as it holds (10^7 layers would be ~10^8 table entries)."""
    directory = _copy(tmp_path, num_hidden_layers=10**7)
    with pytest.raises(CheckpointError, match="missing: model.layers.3.* and more"):
        from_hf(directory, check_memory=False)
