"""nnx_matrix_axes: Muon reads each Flax NNX kernel as the matrix its module uses."""

import jax
import numpy as np
import pytest
from flax import nnx

import muonjax
from muonjax.nnx_axes import nnx_matrix_axes

# Jordan's quintic leaves singular values in about [0.68, 1.2] (test_newton_schulz)
BAND = (0.6, 1.25)


def _in_band(matrices) -> bool:
    s = np.linalg.svd(np.asarray(matrices, np.float64), compute_uv=False)
    return bool(BAND[0] <= s.min() and s.max() <= BAND[1])


def _random_like(tree, seed=0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _directions(model, matrix_axes, kernels_only=True):
    """Muon's O for random gradients of the model's kernels, as a pure dict."""
    params = nnx.state(model, nnx.Param)
    if kernels_only:  # Muon alone takes matrices only: drop biases
        params = nnx.filter_state(params, lambda path, _: path[-1] == "kernel")
    tx = muonjax.scale_by_muon(momentum=0.0, nesterov=False, matrix_axes=matrix_axes)
    o, _ = tx.update(_random_like(params), tx.init(params))
    return nnx.to_pure_dict(o)


def _attention(rngs):
    return nnx.MultiHeadAttention(
        num_heads=4, in_features=16, qkv_features=32, decode=False, rngs=rngs
    )


def test_attention_kernels_are_whole_projections():
    model = _attention(nnx.Rngs(0))
    o = _directions(model, nnx_matrix_axes(model))
    default = _directions(model, None)  # per-head (heads, head_dim) matrices
    for name in ("query", "key", "value"):
        assert o[name]["kernel"].shape == (16, 4, 8)
        assert _in_band(o[name]["kernel"].reshape(16, 32)), name
        assert not _in_band(default[name]["kernel"].reshape(16, 32)), name
    assert _in_band(o["out"]["kernel"].reshape(32, 16))
    assert not _in_band(default["out"]["kernel"].reshape(32, 16))


def test_linear_general_in_and_out_axes():
    model = nnx.LinearGeneral(
        in_features=(4, 8), out_features=(2, 6), axis=(-2, -1), rngs=nnx.Rngs(1)
    )
    o = _directions(model, nnx_matrix_axes(model))["kernel"]
    assert o.shape == (4, 8, 2, 6)
    assert _in_band(o.reshape(32, 12))
    assert not _in_band(_directions(model, None)["kernel"].reshape(32, 12))


def test_linear_general_batch_axis_is_a_stack():
    model = nnx.LinearGeneral(
        in_features=(4, 5), out_features=6, axis=(-2, -1), batch_axis={0: 3}, rngs=nnx.Rngs(2)
    )
    o = _directions(model, nnx_matrix_axes(model))["kernel"]
    assert o.shape == (3, 4, 5, 6)
    assert _in_band(o.reshape(3, 20, 6))  # each batch entry its own (20, 6) matrix
    assert not _in_band(o.reshape(60, 6))  # ... not one matrix over the batch
    assert not _in_band(_directions(model, None)["kernel"].reshape(3, 20, 6))


def test_conv_kernel_is_taps_times_channels_by_out():
    model = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=nnx.Rngs(3))
    o = _directions(model, nnx_matrix_axes(model))["kernel"]
    assert o.shape == (3, 3, 3, 8)
    assert _in_band(o.reshape(27, 8))
    assert not _in_band(_directions(model, None)["kernel"].reshape(27, 8))  # per tap


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose_kernel(transpose_kernel):
    model = nnx.ConvTranspose(
        3, 8, kernel_size=(3, 3), transpose_kernel=transpose_kernel, rngs=nnx.Rngs(3)
    )
    o = _directions(model, nnx_matrix_axes(model))["kernel"]
    if transpose_kernel:  # stored (3, 3, Cout, Cin)
        o = o.transpose(0, 1, 3, 2)
    assert _in_band(o.reshape(27, 8))


def test_einsum_contracted_axes_are_rows():
    model = nnx.Einsum("nta,hab->nthb", (8, 2, 4), rngs=nnx.Rngs(4))
    o = _directions(model, nnx_matrix_axes(model))["kernel"]
    as_matrix = lambda k: k.transpose(1, 0, 2).reshape(2, 32)  # (a, h * b)
    assert _in_band(as_matrix(o))
    assert not _in_band(as_matrix(_directions(model, None)["kernel"]))


@pytest.mark.parametrize(
    "einsum_str, kernel_shape, expected",
    [
        ("bthd,hdk->bthk", (2, 3, 4), muonjax.MatrixAxes(rows=(-2,), cols=(-1,))),  # h a stack
        ("btd,dnh->btnh", (2, 3, 4), muonjax.MatrixAxes(rows=(-3,), cols=(-2, -1))),
        ("...d,df->...f", (3, 4), muonjax.MatrixAxes(rows=(-2,), cols=(-1,))),
        ("bd,...d->b...", (3, 4), None),  # ellipsis in the kernel: the default
    ],
)
def test_einsum_rule(einsum_str, kernel_shape, expected):
    model = nnx.Einsum(einsum_str, kernel_shape, rngs=nnx.Rngs(0))
    fn = nnx_matrix_axes(model)
    path = (jax.tree_util.DictKey("kernel"),)
    assert fn(path, model.kernel[...]) == expected


def test_vmap_stacked_layers_keep_their_stack_axis():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return _attention(nnx.Rngs(key))

    model = make(jax.random.split(jax.random.key(5), 3))
    o = _directions(model, nnx_matrix_axes(model))
    assert o["query"]["kernel"].shape == (3, 16, 4, 8)
    assert _in_band(o["query"]["kernel"].reshape(3, 16, 32))
    assert _in_band(o["out"]["kernel"].reshape(3, 32, 16))


def test_nested_model_paths_and_unknown_leaves():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 16, rngs=rngs)
            self.layers = nnx.List([_attention(rngs), nnx.Linear(16, 16, rngs=rngs)])
            self.conv = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)

    model = Block(nnx.Rngs(6))
    fn = nnx_matrix_axes(model)
    state = nnx.state(model, nnx.Param)
    got = {jax.tree_util.keystr(p): fn(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state)}
    assert got["['layers'][0]['value']['kernel'].value"] == muonjax.MatrixAxes((-3,), (-2, -1))
    assert got["['layers'][1]['kernel'].value"] == muonjax.MatrixAxes(-2, -1)
    assert got["['conv']['kernel'].value"] == muonjax.MatrixAxes((-4, -3, -2), (-1,))
    assert got["['embed']['embedding'].value"] is None
    assert got["['layers'][0]['value']['bias'].value"] is None
    # a pure dict (nnx.Optimizer's view) has the same paths without .value
    pure = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    assert {jax.tree_util.keystr(p) + ".value": fn(p, x) for p, x in pure} == got


def test_moonlight_through_nnx_optimizer():
    # optax.partition hands matrix_axes the same paths; nnx.Optimizer passes
    # pure arrays. With lr 1 and no weight decay the step is -0.2 sqrt(max(A, B)) O.
    model = _attention(nnx.Rngs(7))
    tx = muonjax.moonlight(1.0, weight_decay=0.0, matrix_axes=nnx_matrix_axes(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer.update(model, _random_like(nnx.state(model, nnx.Param), seed=8))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    step = jax.tree.map(lambda a, b: np.asarray(a - b), after, before)
    scale = 0.2 * 32**0.5  # from the (16, 32) / (32, 16) matrices, not (4, 8)
    assert _in_band(-step["query"]["kernel"].reshape(16, 32) / scale)
    assert _in_band(-step["out"]["kernel"].reshape(32, 16) / scale)


def test_a_model_is_required():
    model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="nnx.Module"):
        nnx_matrix_axes(nnx.state(model, nnx.Param))
