"""Hugging Face DeepseekV3 checkpoints (Moonlight's released format) <-> `Transformer`.

One table, `_entries`, names every tensor of the checkpoint and where it lives
in muonjax's scanned layout (stack, layer, expert); loading and exporting both
read it. Two conventions differ from muonjax's and are converted here:

- Linear weights are stored (out, in); muonjax's kernels are (in, out).
- DeepSeek stores each head's rotary query features, and the shared rotary key
  in kv_a_proj_with_mqa, interleaved in pairs (x0, x1), (x2, x3), ...; muonjax
  rotates halves (the even features, then the odd ones). With
  `rope_interleave` (DeepseekV3's default) those columns are permuted.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from muonjax.models.config import ModelConfig
from muonjax.models.counts import abstract_model
from muonjax.models.transformer import Transformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPE = "deepseek_v3"
DEEPSEEK_LATENT_NORM_EPS = 1e-6  # DeepseekV3's q_a_layernorm / kv_a_layernorm
DTYPES = ("float32", "bfloat16")


class CheckpointError(ValueError):
    """A checkpoint muonjax cannot read, or a model it cannot write as one."""


# -- config ---------------------------------------------------------------------------------------

# config.json key -> ModelConfig field, taken as they are.
_SAME = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "n_heads",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "n_routed_experts": "n_routed_experts",
    "num_experts_per_tok": "experts_per_token",
    "moe_intermediate_size": "moe_intermediate_size",
    "routed_scaling_factor": "routed_scaling_factor",
    "norm_topk_prob": "norm_topk_prob",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "initializer_range": "init_std",
    "aux_loss_alpha": "aux_loss_coef",  # DeepSeek's sequence-wise balance loss (seq_aux)
}

# config.json key -> (the value muonjax's model computes, what the key means), for
# keys whose other values muonjax cannot express. A missing key has DeepseekV3's default.
_REQUIRED = {
    "hidden_act": ("silu", "the MLP activation"),
    "tie_word_embeddings": (False, "tied input and output embeddings"),
    "attention_bias": (False, "attention projection biases"),
    "rope_scaling": (None, "rotary scaling (e.g. YaRN)"),
    "scoring_func": ("sigmoid", "the router's scoring function"),
    "topk_method": ("noaux_tc", "the router's top-k method"),
    "moe_layer_freq": (1, "MoE on every layer after the first dense ones"),
    "attention_dropout": (0.0, "attention dropout"),
    "seq_aux": (True, "a batch-wise balance loss"),
}


def hf_config(directory) -> ModelConfig:
    """The ModelConfig of the checkpoint in `directory` (its config.json);
    CheckpointError for what muonjax's model cannot express."""
    hf = _read_json(pathlib.Path(directory) / CONFIG_FILE)
    where = f"{pathlib.Path(directory) / CONFIG_FILE}"
    # transformers 5 writes rotary settings as rope_parameters, 4 (Moonlight's) as
    # rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or {}
    if "rope_theta" in rope:
        hf = {**hf, "rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        hf = {**hf, "rope_scaling": rope}
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{where}: model_type {hf.get('model_type')!r}; muonjax reads {MODEL_TYPE!r} "
            "(DeepseekV3ForCausalLM, the format of Moonlight and DeepSeek-V3)"
        )
    problems = [
        f"{key}={hf[key]!r} ({meaning}; muonjax has {value!r})"
        for key, (value, meaning) in _REQUIRED.items()
        if key in hf and hf[key] != value
    ]
    n_group, topk_group = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if topk_group < n_group:
        problems.append(
            f"n_group={n_group}, topk_group={topk_group} (group-limited routing; muonjax "
            "routes over all experts)"
        )
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        problems.append(f"num_key_value_heads={kv_heads} (MLA has one per attention head)")
    if problems:
        raise CheckpointError(f"{where}: muonjax cannot express " + "; ".join(problems))
    missing = [key for key in _SAME if key not in hf and key != "aux_loss_alpha"]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}")
    fields = {field: hf[key] for key, field in _SAME.items() if key in hf}
    n_layers = fields["n_layers"]
    try:
        return ModelConfig(
            **fields,
            attention="mla",
            first_k_dense=min(hf.get("first_k_dense_replace", 0), n_layers),
            n_shared_experts=hf.get("n_shared_experts") or 0,
            latent_norm_eps=DEEPSEEK_LATENT_NORM_EPS,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict:
    """config.json for `config` as transformers' DeepseekV3ForCausalLM reads it."""
    problems = []
    if config.attention != "mla":
        problems.append(f"attention={config.attention!r} (DeepseekV3 is MLA only)")
    if config.latent_norm_eps != DEEPSEEK_LATENT_NORM_EPS:
        problems.append(
            f"latent_norm_eps={config.latent_norm_eps} (DeepseekV3's latent norms use "
            f"{DEEPSEEK_LATENT_NORM_EPS})"
        )
    if config.n_shared_experts == 0 and config.n_moe_layers:
        problems.append("n_shared_experts=0 (DeepseekV3's MoE always has shared experts)")
    if problems:
        raise CheckpointError("not expressible as a DeepseekV3 checkpoint: " + "; ".join(problems))
    hf = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": MODEL_TYPE}
    hf |= {key: getattr(config, field) for key, field in _SAME.items()}
    hf |= {key: value for key, (value, _) in _REQUIRED.items()}
    return hf | {
        "first_k_dense_replace": config.first_k_dense,
        "n_shared_experts": config.n_shared_experts,
        "num_key_value_heads": config.n_heads,
        "n_group": 1,
        "topk_group": 1,
        "rope_interleave": True,
        "num_nextn_predict_layers": 0,
        # muonjax has no position limit; transformers sizes nothing by this.
        "max_position_embeddings": 8192,
        "torch_dtype": dtype,
    }


# -- the tensor table -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One checkpoint tensor: muonjax's leaf `leaf` at `index` (layer within
    its stack, then expert), converted by `kind`: "copy", "t" (transpose), or
    "q" / "kv" (transpose, and the rotary columns permuted)."""

    name: str
    leaf: tuple[str, ...]
    index: tuple[int, ...]
    kind: str


_ATTENTION = {  # muonjax (module, param) -> (HF name, kind)
    ("q_proj", "kernel"): ("self_attn.q_proj.weight", "q"),
    ("q_a_proj", "kernel"): ("self_attn.q_a_proj.weight", "t"),
    ("q_a_norm", "scale"): ("self_attn.q_a_layernorm.weight", "copy"),
    ("q_b_proj", "kernel"): ("self_attn.q_b_proj.weight", "q"),
    ("kv_a_proj", "kernel"): ("self_attn.kv_a_proj_with_mqa.weight", "kv"),
    ("kv_a_norm", "scale"): ("self_attn.kv_a_layernorm.weight", "copy"),
    ("kv_b_proj", "kernel"): ("self_attn.kv_b_proj.weight", "t"),
    ("o_proj", "kernel"): ("self_attn.o_proj.weight", "t"),
}
_PROJ = ("gate", "up", "down")


def _entries(config: ModelConfig) -> list[_Entry]:
    """Every tensor of the checkpoint, in transformers' order."""
    c = config
    query = ["q_proj"] if c.q_lora_rank is None else ["q_a_proj", "q_a_norm", "q_b_proj"]
    attention = [(m, p) for (m, p) in _ATTENTION if m in query or not m.startswith("q")]
    entries = [_Entry("model.embed_tokens.weight", ("embed", "embedding"), (), "copy")]
    for i in range(c.n_layers):
        moe = i >= c.first_k_dense
        stack, j = ("moe_layers", i - c.first_k_dense) if moe else ("dense_layers", i)
        prefix = f"model.layers.{i}."

        def add(name, leaf, kind, index=(j,), prefix=prefix, stack=stack):
            entries.append(_Entry(prefix + name, (stack, *leaf), index, kind))

        for module, param in attention:
            name, kind = _ATTENTION[module, param]
            add(name, ("attn", module, param), kind)
        if moe:
            for e in range(c.n_routed_experts):
                for p in _PROJ:
                    add(f"mlp.experts.{e}.{p}_proj.weight", ("moe", "experts", p), "t", (j, e))
            add("mlp.gate.weight", ("moe", "router", "kernel"), "t")
            add("mlp.gate.e_score_correction_bias", ("moe", "router", "bias"), "copy")
            if c.n_shared_experts:
                for p in _PROJ:
                    add(f"mlp.shared_experts.{p}_proj.weight", ("moe", "shared", p, "kernel"), "t")
        else:
            for p in _PROJ:
                add(f"mlp.{p}_proj.weight", ("mlp", p, "kernel"), "t")
        add("input_layernorm.weight", ("attn_norm", "scale"), "copy")
        add("post_attention_layernorm.weight", ("mlp_norm", "scale"), "copy")
    entries.append(_Entry("model.norm.weight", ("final_norm", "scale"), (), "copy"))
    entries.append(_Entry("lm_head.weight", ("lm_head", "kernel"), (), "t"))
    return entries


def _rope_order(n: int) -> np.ndarray:
    """muonjax's rotary feature j is the checkpoint's interleaved feature order[j]."""
    return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])


def _columns(config: ModelConfig, kind: str, interleaved: bool) -> np.ndarray | None:
    """muonjax's column j of a "q" / "kv" kernel is the checkpoint's row columns[j]."""
    c = config
    if kind not in ("q", "kv") or not interleaved:
        return None
    rope = c.kv_lora_rank + _rope_order(c.qk_rope_head_dim)
    if kind == "kv":
        return np.concatenate([np.arange(c.kv_lora_rank), rope])
    head = np.concatenate(
        [np.arange(c.qk_nope_head_dim), c.qk_nope_head_dim + _rope_order(c.qk_rope_head_dim)]
    )
    return np.concatenate([h * c.qk_head_dim + head for h in range(c.n_heads)])


def _to_muonjax(tensor: np.ndarray, kind: str, columns) -> np.ndarray:
    """A checkpoint tensor in muonjax's orientation, float32."""
    x = np.asarray(tensor, np.float32)
    if kind == "copy":
        return x
    if columns is not None:
        x = x[columns]
    return x.T


def _to_hf(array: np.ndarray, kind: str, columns) -> np.ndarray:
    if kind == "copy":
        return array
    x = array.T
    if columns is not None:
        x = x[np.argsort(columns)]
    return np.ascontiguousarray(x)


# -- loading --------------------------------------------------------------------------------------


class _Files:
    """The checkpoint's tensors by name, each file opened lazily and closed by `close`."""

    def __init__(self, directory: pathlib.Path):
        from safetensors import safe_open

        self._open_file = lambda path: safe_open(path, framework="numpy")
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            self.file_of = {name: directory / file for name, file in weight_map.items()}
        elif (directory / SINGLE_FILE).exists():
            with self._open_file(directory / SINGLE_FILE) as f:
                self.file_of = dict.fromkeys(f.keys(), directory / SINGLE_FILE)
        else:
            raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} is there")
        self._open = {}

    def _handle(self, name: str):
        path = self.file_of[name]
        if path not in self._open:
            if not path.exists():
                raise CheckpointError(f"{path} (holding {name}) is missing")
            self._open[path] = self._open_file(path).__enter__()
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        """Unmaps every file, so pages read so far stop counting as this process's memory."""
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open = {}


def _expected_shape(entry: _Entry, leaf_shape) -> tuple[int, ...]:
    shape = tuple(leaf_shape[len(entry.index) :])
    return shape if entry.kind == "copy" else shape[::-1]


def from_hf(
    directory, *, dtype: str | None = None, config: ModelConfig | None = None, shardings=None
) -> Transformer:
    """The Transformer of a Hugging Face DeepseekV3 checkpoint (config.json and
    safetensors, one file or sharded with an index).

    `dtype`: the activations' and matmuls' (default float32; parameters stay
    float32). `config`: `hf_config(directory)` by default; pass it changed
    (e.g. `.replace(remat=True)`) for other settings of the same model:
    shape-defining fields must match the checkpoint. `shardings`: a pytree
    like `nnx.state(model)` of jax Shardings (e.g. `muonjax.parallel.Plan(mesh,
    nnx.state(abstract_model(config))).params`, every variable); by default
    one device. Each device's block is read from the memory-mapped files as it
    is placed, a stack of layers one layer at a time, so host memory beyond the
    model itself stays near one layer's block of one parameter, whatever the
    checkpoint's size. Parameters are float32.
    """
    directory = pathlib.Path(directory)
    saved = hf_config(directory)
    config = saved if config is None else config
    if dtype is not None:
        config = config.replace(dtype=dtype)
    _check_same_shapes(config, saved, directory)
    interleaved = _read_json(directory / CONFIG_FILE).get("rope_interleave", True)
    graphdef, state = nnx.split(abstract_model(config))
    leaves = {_names(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placement = dict.fromkeys(leaves, device)
    else:
        placement = {_names(path): s for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
    by_leaf: dict[tuple, dict[tuple, _Entry]] = {}
    for entry in _entries(config):
        by_leaf.setdefault(entry.leaf, {})[entry.index] = entry
    files = _Files(directory)
    try:
        _check_tensors(files, by_leaf, leaves, directory, config.n_layers)
        arrays = {}
        for leaf, entries in by_leaf.items():
            kinds = {e.kind for e in entries.values()}
            columns = {kind: _columns(config, kind, interleaved) for kind in kinds}
            read = functools.partial(_block, files, entries, columns, leaves[leaf].shape)
            stacked = bool(next(iter(entries)))
            arrays[leaf] = _place(read, leaves[leaf].shape, placement[leaf], stacked)
            files.close()
    finally:
        files.close()
    state = jax.tree_util.tree_map_with_path(lambda path, _: arrays[_names(path)], state)
    return nnx.merge(graphdef, state)


def _block(files: _Files, entries, columns, shape, index) -> np.ndarray:
    """A leaf's block at `index` (slices of its whole `shape`), float32, read and
    converted one checkpoint tensor at a time into one array."""
    depth = len(next(iter(entries)))
    outer = [range(*s.indices(n)) for s, n in zip(index[:depth], shape[:depth])]
    inner = tuple(index[depth:])
    out = None
    for position, key in enumerate(itertools.product(*outer)):
        e = entries[key]
        value = _to_muonjax(files.read(e.name), e.kind, columns[e.kind])[inner]
        if not depth:
            return value
        if out is None:
            out = np.empty((*map(len, outer), *value.shape), np.float32)
        out[np.unravel_index(position, out.shape[:depth])] = value
    return out


def _place(read, shape, sharding, stacked: bool) -> jax.Array:
    """The leaf on `sharding`, from `read(index) -> block`. A stack of layers is
    built one layer at a time in place on its devices, so that host memory holds
    one layer's block per device, never the whole stack's."""
    if not stacked or not _layers_unsplit(sharding):
        return jax.make_array_from_callback(shape, sharding, read)
    layer_sharding = _per_layer(sharding)
    stack = jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)()
    for i in range(shape[0]):
        layer = jax.make_array_from_callback(
            shape[1:], layer_sharding, lambda index, i=i: read((slice(i, i + 1), *index))[0]
        )
        stack = _set_layer(stack, layer, i)
    return stack


def _layers_unsplit(sharding) -> bool:
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return True
    return isinstance(sharding, jax.sharding.NamedSharding) and (
        len(sharding.spec) == 0 or sharding.spec[0] is None
    )


def _per_layer(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:])
        )
    return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack, layer, i):
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def _check_same_shapes(config: ModelConfig, saved: ModelConfig, directory) -> None:
    free = {"dtype", "remat", "moe_dispatch", "aux_loss_coef", "init_std"}
    differ = [
        f"{f.name}={getattr(config, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in free and getattr(config, f.name) != getattr(saved, f.name)
    ]
    if differ:
        raise CheckpointError(
            f"{directory}: the model differs from the checkpoint's: " + "; ".join(differ)
        )


def _check_tensors(files: _Files, by_leaf, leaves, directory, n_layers: int) -> None:
    """Every tensor the model needs is there with its shape, and nothing else
    is (except multi-token-prediction layers past the last, which transformers
    skips too)."""
    wanted = {}
    for leaf, entries in by_leaf.items():
        for entry in entries.values():
            wanted[entry.name] = _expected_shape(entry, leaves[leaf].shape)
    missing = [name for name in wanted if name not in files.file_of]
    extra = [
        name
        for name in files.file_of
        if name not in wanted and not _beyond_last_layer(name, n_layers)
    ]
    wrong = [
        f"{name} {files.shape(name)} (expected {shape})"
        for name, shape in wanted.items()
        if name in files.file_of and files.shape(name) != shape
    ]
    problems = []
    for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{what}: {', '.join(names[:3])}{more}")
    if problems:
        raise CheckpointError(f"{directory}: tensors do not fit the model: " + "; ".join(problems))


def _beyond_last_layer(name: str, n_layers: int) -> bool:
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= n_layers


# -- export ---------------------------------------------------------------------------------------


def to_hf(
    model: Transformer,
    directory,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 4 << 30,
    extra_files: dict[str, pathlib.Path] | None = None,
) -> pathlib.Path:
    """Writes `model` as a Hugging Face DeepseekV3 checkpoint that transformers'
    DeepseekV3ForCausalLM loads: config.json, safetensors shards of at most
    `max_shard_bytes` (one tensor may exceed it) and their index.

    `dtype`: the tensors' type ("float32": exact; "bfloat16" rounds).
    `extra_files`: name -> file copied in (e.g. the tokenizer's). `directory`
    must not exist; it appears whole or not at all. Reads one layer's slice of
    a parameter at a time.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} (valid: {', '.join(DTYPES)})")
    directory = pathlib.Path(directory)
    if directory.exists():
        raise CheckpointError(f"{directory} exists; to_hf writes a new directory")
    config = model.config
    hf_json = config_to_hf(config, dtype)
    state = nnx.state(model)
    leaves = {_names(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
    for leaf in leaves.values():
        if not leaf.is_fully_addressable:
            raise CheckpointError("to_hf needs every parameter on this process (run it on one)")
    entries = _entries(config)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    sizes = [
        math.prod(_expected_shape(e, leaves[e.leaf].shape)) * np_dtype.itemsize for e in entries
    ]
    shards = _plan_shards(sizes, max_shard_bytes)
    columns = {kind: _columns(config, kind, True) for kind in ("copy", "t", "q", "kv")}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        weight_map = {}
        for k, members in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for i in members:
                e = entries[i]
                value = np.asarray(leaves[e.leaf][e.index] if e.index else leaves[e.leaf])
                tensors[e.name] = _to_hf(value, e.kind, columns[e.kind]).astype(np_dtype)
                weight_map[e.name] = file
            _save_safetensors(tensors, tmp / file)
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        _write_json(tmp / INDEX_FILE, index)
        _write_json(tmp / CONFIG_FILE, hf_json)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _plan_shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive tensors grouped into shards of at most `limit` bytes each."""
    shards, used = [[]], 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def _save_safetensors(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})  # "pt": transformers' loader asks


# -- helpers --------------------------------------------------------------------------------------


def _names(path) -> tuple[str, ...]:
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return names[:-1] if names[-1] == "value" else names


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found (a Hugging Face checkpoint has one)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_hf_checkpoint(directory) -> bool:
    """Whether `directory` looks like a Hugging Face checkpoint (config.json with a
    model_type, and safetensors)."""
    directory = pathlib.Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        return False
    try:
        model_type = json.loads((directory / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    has_weights = (directory / INDEX_FILE).exists() or (directory / SINGLE_FILE).exists()
    return bool(model_type) and has_weights
