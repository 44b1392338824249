"""Hugging Face DeepseekV3 checkpoints (Moonlight's released format) <-> `Transformer`.

One table, `_entries`, names every tensor of the checkpoint and where it lives
in muonjax's scanned layout (stack, layer, expert); loading and exporting both
read it. Two conventions differ from muonjax's and are converted here:

- Linear weights are stored (out, in); muonjax's kernels are (in, out).
- DeepSeek stores each head's rotary query features, and the shared rotary key
  in kv_a_proj_with_mqa, interleaved in pairs (x0, x1), (x2, x3), ...; muonjax
  rotates halves (the even features, then the odd ones). With
  `rope_interleave` (DeepseekV3's default) those columns are permuted.

A checkpoint from a hub is untrusted input: what `from_hf` reads is checked
before any work or memory depends on it.

- Files: the index names its files by plain name (no `/`, `\\`, `.`, `..` or
  NUL), so nothing outside the folder is read on its word. A symlink in the
  folder is followed wherever it points: the folder's owner made it, not the
  index (the Hugging Face cache links snapshots/<rev>/<file> to
  ../../blobs/<hash>). Every file, after symlinks, must be a regular file (a
  FIFO would block forever, a device never end); config.json and the index
  are at most MAX_JSON_BYTES.
- config.json: every value's type and range (ModelConfig's checks, named by
  their config.json keys), then the model's float32 parameters against the
  target devices' memory, before any per-layer or per-tensor work.
- safetensors: the header length within the file (checked here, before
  safetensors reads the header), then safetensors' own checks (a JSON header,
  tensors that tile the data exactly: no gap, overlap or out-of-range offset);
  each tensor's dtype, from the header before any data is read, must be one
  of LOADABLE_DTYPES (exact in float32).

Each failure is one CheckpointError naming the file and what is wrong.
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
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from muonjax.files import NotRegularFile, is_plain_name, regular_file_size, written_whole
from muonjax.models.config import InvalidModelConfig, ModelConfig
from muonjax.models.counts import abstract_model
from muonjax.models.memory import TooLarge, check_fits
from muonjax.models.transformer import Transformer
from muonjax.optim.paths import path_names

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPE = "deepseek_v3"
DEEPSEEK_LATENT_NORM_EPS = 1e-6  # DeepseekV3's q_a_layernorm / kv_a_layernorm
DTYPES = ("float32", "bfloat16")
LOADABLE_DTYPES = ("F32", "BF16", "F16")  # safetensors' names; each converts to float32 exactly
MAX_JSON_BYTES = 64 << 20  # config.json and the index; real ones are kilobytes


class CheckpointError(ValueError):
    """A checkpoint muonjax cannot read, or a model it cannot write as one."""


class CheckpointTooLarge(CheckpointError, TooLarge):
    """A checkpoint's model that cannot fit in the devices' memory."""


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


# config.json keys read besides _SAME's, which are integers (or null: DeepseekV3's
# default) -> their least valid value.
_OTHER_INTS = {
    "first_k_dense_replace": 0,
    "n_shared_experts": 0,
    "n_group": 1,
    "topk_group": 1,
    "num_key_value_heads": 1,
}
# ModelConfig field -> its config.json key, to name a bad value as the file does.
_HF_KEY = {field: key for key, field in _SAME.items()} | {"first_k_dense": "first_k_dense_replace"}


def hf_config(directory) -> ModelConfig:
    """The ModelConfig of the checkpoint in `directory` (its config.json);
    CheckpointError for what muonjax's model cannot express."""
    where = pathlib.Path(directory) / CONFIG_FILE
    hf = _read_json(where)
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{where}: model_type {hf.get('model_type')!r}; muonjax reads {MODEL_TYPE!r} "
            "(DeepseekV3ForCausalLM, the format of Moonlight and DeepSeek-V3)"
        )
    bad = _bad_types(hf)
    if bad:
        raise CheckpointError(f"{where}: " + "; ".join(bad))
    hf = _rope_settings(hf)
    problems = _inexpressible(hf)
    if problems:
        raise CheckpointError(f"{where}: muonjax cannot express " + "; ".join(problems))
    missing = [key for key in _SAME if key not in hf and key != "aux_loss_alpha"]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}")
    fields = {field: hf[key] for key, field in _SAME.items() if key in hf}
    first_k_dense = hf.get("first_k_dense_replace", 0)
    if isinstance(fields["n_layers"], int):  # else ModelConfig names it
        first_k_dense = min(first_k_dense, fields["n_layers"])  # more: every layer dense
    try:
        return ModelConfig(
            **fields,
            attention="mla",
            first_k_dense=first_k_dense,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            latent_norm_eps=DEEPSEEK_LATENT_NORM_EPS,
        )
    except InvalidModelConfig as e:
        named = [_HF_KEY.get(field, field) + text.removeprefix(field) for field, text in e.problems]
        raise CheckpointError(f"{where}: " + "; ".join(named)) from None


def _bad_types(hf: dict) -> list[str]:
    """The values hf_config reads itself that have the wrong JSON type or range
    (ModelConfig checks the fields it is given)."""
    bad = [
        f"{key}={hf[key]!r} (must be an integer >= {least})"
        for key, least in _OTHER_INTS.items()
        if hf.get(key) is not None and not (type(hf[key]) is int and hf[key] >= least)
    ]  # type(...) is int: true and false are no integers here
    if hf.get("rope_parameters") is not None and not isinstance(hf["rope_parameters"], dict):
        bad.append(f"rope_parameters={hf['rope_parameters']!r} (must be an object or null)")
    if not isinstance(hf.get("rope_interleave", True), bool):
        bad.append(f"rope_interleave={hf['rope_interleave']!r} (must be true or false)")
    return bad


def _rope_settings(hf: dict) -> dict:
    """`hf` with rope_theta and rope_scaling where transformers 4 (Moonlight's)
    writes them; transformers 5 writes both as rope_parameters."""
    rope = hf.get("rope_parameters") or {}
    if "rope_theta" in rope:
        hf = {**hf, "rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        hf = {**hf, "rope_scaling": rope}
    return hf


def _inexpressible(hf: dict) -> list[str]:
    """The settings of config.json that muonjax's model cannot express."""
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
    return problems


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


def _entries(config: ModelConfig) -> Iterator[_Entry]:
    """Every tensor of the checkpoint, in transformers' order, one at a time."""
    c = config
    query = ["q_proj"] if c.q_lora_rank is None else ["q_a_proj", "q_a_norm", "q_b_proj"]
    attention = [(m, p) for (m, p) in _ATTENTION if m in query or not m.startswith("q")]
    yield _Entry("model.embed_tokens.weight", ("embed", "embedding"), (), "copy")
    for i in range(c.n_layers):
        moe = i >= c.first_k_dense
        stack, j = ("moe_layers", i - c.first_k_dense) if moe else ("dense_layers", i)

        def entry(name, leaf, kind, index=(j,), prefix=f"model.layers.{i}.", stack=stack):
            return _Entry(prefix + name, (stack, *leaf), index, kind)

        for module, param in attention:
            name, kind = _ATTENTION[module, param]
            yield entry(name, ("attn", module, param), kind)
        if moe:
            for e in range(c.n_routed_experts):
                for p in _PROJ:
                    name = f"mlp.experts.{e}.{p}_proj.weight"
                    yield entry(name, ("moe", "experts", p), "t", (j, e))
            yield entry("mlp.gate.weight", ("moe", "router", "kernel"), "t")
            yield entry("mlp.gate.e_score_correction_bias", ("moe", "router", "bias"), "copy")
            if c.n_shared_experts:
                for p in _PROJ:
                    yield entry(
                        f"mlp.shared_experts.{p}_proj.weight", ("moe", "shared", p, "kernel"), "t"
                    )
        else:
            for p in _PROJ:
                yield entry(f"mlp.{p}_proj.weight", ("mlp", p, "kernel"), "t")
        yield entry("input_layernorm.weight", ("attn_norm", "scale"), "copy")
        yield entry("post_attention_layernorm.weight", ("mlp_norm", "scale"), "copy")
    yield _Entry("model.norm.weight", ("final_norm", "scale"), (), "copy")
    yield _Entry("lm_head.weight", ("lm_head", "kernel"), (), "t")


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
    """The checkpoint's tensors by name: every file checked and its header read
    up front (`file_of`, `header`: name -> (dtype, shape)), each file opened
    lazily for reading and closed by `close`."""

    def __init__(self, directory: pathlib.Path):
        index, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if os.path.lexists(index):
            names_in = _weight_map(index)
        elif os.path.lexists(single):
            names_in = {single: None}
        else:
            raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} is there")
        self.file_of, self.header = {}, {}
        for path, names in names_in.items():
            header = _read_header(path, names)
            self.file_of |= dict.fromkeys(header, path)
            self.header |= header
        unloadable = [f"{n} ({d})" for n, (d, _) in self.header.items() if d not in LOADABLE_DTYPES]
        if unloadable:
            raise CheckpointError(
                f"{directory}: tensors of a type muonjax does not load: {_listed(unloadable)} "
                f"(loadable: {', '.join(LOADABLE_DTYPES)}, each exact in float32)"
            )
        self._open = {}

    def _handle(self, path: pathlib.Path):
        if path not in self._open:
            self._open[path] = safe_open(path, framework="numpy").__enter__()
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.header[name][1]

    def read(self, name: str) -> np.ndarray:
        path = self.file_of[name]
        try:
            return self._handle(path).get_tensor(name)
        except (SafetensorError, OSError) as e:  # changed since its header was read
            raise CheckpointError(f"{path}: cannot read {name} ({e})") from None

    def close(self) -> None:
        """Unmaps every file, so pages read so far stop counting as this process's memory."""
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open = {}


def _weight_map(index: pathlib.Path) -> dict[pathlib.Path, list[str]]:
    """The files of a sharded checkpoint and the tensors its index puts in each;
    CheckpointError for a file named other than by a plain name in the folder."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map")
    outside = [f"{name}: {file!r}" for name, file in weight_map.items() if not is_plain_name(file)]
    if outside:
        raise CheckpointError(
            f"{index}: weight_map names files that are not plain file names in "
            f"{index.parent}: {_listed(outside)}"
        )
    names_in = {}
    for name, file in weight_map.items():
        names_in.setdefault(index.parent / file, []).append(name)
    return names_in


def _read_header(path: pathlib.Path, names: list[str] | None) -> dict[str, tuple]:
    """name -> (dtype, shape) of `names` (None: every tensor) in the safetensors
    file `path`, from its header alone; CheckpointError for a damaged file or one
    that lacks a name."""
    size = _regular_file_size(path)
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
    if length > size - 8:  # refused here, whatever safetensors' version would allocate
        raise CheckpointError(
            f"{path}: not a safetensors file (header length {length:,} is past the end of "
            f"its {size:,} bytes)"
        )
    try:
        with safe_open(path, framework="numpy") as f:
            present = set(f.keys())
            names = sorted(present) if names is None else names
            lacking = [name for name in names if name not in present]
            if lacking:
                raise CheckpointError(
                    f"{path} lacks {_listed(lacking)}, which {INDEX_FILE} says it holds"
                )
            slices = {name: f.get_slice(name) for name in names}
            return {n: (s.get_dtype(), tuple(s.get_shape())) for n, s in slices.items()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def _expected_shape(entry: _Entry, leaf_shape) -> tuple[int, ...]:
    shape = tuple(leaf_shape[len(entry.index) :])
    return shape if entry.kind == "copy" else shape[::-1]


def from_hf(
    directory,
    *,
    dtype: str | None = None,
    config: ModelConfig | None = None,
    shardings=None,
    check_memory: bool = True,
) -> Transformer:
    """The Transformer of a Hugging Face DeepseekV3 checkpoint (config.json and
    safetensors, one file or sharded with an index).

    `dtype`: the activations' and matmuls' (default float32; parameters stay
    float32). `config`: `hf_config(directory)` by default; pass it changed
    (e.g. `.replace(remat="full")`) for other settings of the same model:
    shape-defining fields must match the checkpoint. `shardings`: a pytree
    like `nnx.state(model)` of jax Shardings (e.g. `muonjax.parallel.Plan(mesh,
    nnx.state(abstract_model(config))).params`, every variable); by default
    one device. Each device's block is read from the memory-mapped files as it
    is placed, a stack of layers one layer at a time, so host memory beyond the
    model itself stays near one layer's block of one parameter, whatever the
    checkpoint's size. Parameters are float32. `check_memory`: first refuse
    (CheckpointTooLarge) a model whose float32 parameters cannot fit in the
    memory of the devices they go to.

    The checkpoint is untrusted input: see the module's docstring for what is
    checked; each failure is a CheckpointError.
    """
    directory = pathlib.Path(directory)
    saved = hf_config(directory)
    config = saved if config is None else config
    if dtype is not None:
        config = config.replace(dtype=dtype)
    _check_same_shapes(config, saved, directory)
    if check_memory:
        _check_fits(config, shardings, directory)
    interleaved = _read_json(directory / CONFIG_FILE).get("rope_interleave", True)
    graphdef, state = nnx.split(abstract_model(config))
    leaves = {path_names(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placement = dict.fromkeys(leaves, device)
    else:
        placement = {
            path_names(path): s for path, s in jax.tree_util.tree_leaves_with_path(shardings)
        }
    files = _Files(directory)
    by_leaf = _tensor_table(config, files, leaves, directory)
    try:
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
    state = jax.tree_util.tree_map_with_path(lambda path, _: arrays[path_names(path)], state)
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


def _check_fits(config: ModelConfig, shardings, directory) -> None:
    """CheckpointTooLarge unless the model's float32 parameters fit in the memory
    of the devices `shardings` place them on (default: the first device)."""
    if shardings is None:
        devices = [jax.devices()[0]]
    else:
        devices = list({d for s in jax.tree.leaves(shardings) for d in s.device_set})
    try:
        check_fits(config, devices, what=f"{directory}: the model")
    except TooLarge as e:
        raise CheckpointTooLarge(str(e)) from None


def _tensor_table(config: ModelConfig, files: _Files, leaves, directory) -> dict:
    """The model's tensors by leaf, then index, checked against the checkpoint's.
    Built only as far as the checkpoint has tensors: a model that needs more
    (10^9 small layers, say) is refused without a step per tensor it needs."""
    entries = _entries(config)
    table = list(itertools.islice(entries, len(files.file_of) + 1))
    if next(entries, None) is not None:
        missing = [e.name for e in table if e.name not in files.file_of]  # one at least
        raise CheckpointError(
            f"{directory}: tensors do not fit the model: missing: {', '.join(missing[:3])} and "
            f"more (it needs over {len(table):,} tensors; the checkpoint has "
            f"{len(files.file_of):,})"
        )
    by_leaf: dict[tuple, dict[tuple, _Entry]] = {}
    for entry in table:
        by_leaf.setdefault(entry.leaf, {})[entry.index] = entry
    _check_tensors(files, by_leaf, leaves, directory, config.n_layers)
    return by_leaf


def _check_same_shapes(config: ModelConfig, saved: ModelConfig, directory) -> None:
    free = {"dtype", "remat", "moe_dispatch", "attention_kernel", "aux_loss_coef", "init_std"}
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
    problems = [
        f"{what}: {_listed(names)}"
        for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
        if names
    ]
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
    leaves = {path_names(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
    for leaf in leaves.values():
        if not leaf.is_fully_addressable:
            raise CheckpointError("to_hf needs every parameter on this process (run it on one)")
    entries = list(_entries(config))
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    sizes = [
        math.prod(_expected_shape(e, leaves[e.leaf].shape)) * np_dtype.itemsize for e in entries
    ]
    shards = _plan_shards(sizes, max_shard_bytes)
    columns = {kind: _columns(config, kind, True) for kind in ("copy", "t", "q", "kv")}
    try:
        with written_whole(directory) as tmp:
            tmp.mkdir()
            _write_checkpoint(tmp, entries, leaves, shards, sizes, np_dtype, columns)
            _write_json(tmp / CONFIG_FILE, hf_json)
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, tmp / name)
    except FileExistsError:
        raise CheckpointError(
            f"{directory} was created meanwhile; to_hf writes a new one"
        ) from None
    return directory


def _write_checkpoint(folder, entries, leaves, shards, sizes, np_dtype, columns) -> None:
    """The tensors, `shards` of `entries` a file, and their index, written into `folder`."""
    weight_map = {}
    for k, members in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i in members:
            e = entries[i]
            value = np.asarray(leaves[e.leaf][e.index] if e.index else leaves[e.leaf])
            tensors[e.name] = _to_hf(value, e.kind, columns[e.kind]).astype(np_dtype)
            weight_map[e.name] = file
        _save_safetensors(tensors, folder / file)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    _write_json(folder / INDEX_FILE, index)


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


def _read_json(path: pathlib.Path) -> dict:
    """The JSON object in `path`, a regular file of at most MAX_JSON_BYTES."""
    size = _regular_file_size(path)
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size:,} bytes, more than a checkpoint's JSON can be")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_JSON_BYTES + 1))  # bounded: /proc files say 0 bytes
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: [[[[...
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _regular_file_size(path: pathlib.Path) -> int:
    """files.regular_file_size as a CheckpointError."""
    try:
        return regular_file_size(path)
    except NotRegularFile as e:
        raise CheckpointError(str(e)) from None


def _listed(names: list[str]) -> str:
    """The first three of `names`, and how many more."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_hf_checkpoint(directory) -> bool:
    """Whether `directory` looks like a Hugging Face checkpoint (config.json with a
    model_type, and safetensors). A config.json that cannot be read safely (a FIFO,
    say) beside safetensors counts as one, for `from_hf` to refuse by name."""
    directory = pathlib.Path(directory)
    has_weights = any(os.path.lexists(directory / f) for f in (INDEX_FILE, SINGLE_FILE))
    if not (has_weights and os.path.lexists(directory / CONFIG_FILE)):
        return False
    try:
        return bool(_read_json(directory / CONFIG_FILE).get("model_type"))
    except CheckpointError:
        return True
