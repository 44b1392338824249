"""The "megablox" expert dispatch (Pallas TPU grouped matmul): in interpret
mode on the CPU against the float64 per-token loop (forward and every
gradient), inside ShardedExperts against one device, and compiled for a TPU
slice from this CPU machine (the Mosaic kernel, no loop over experts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_dispatch import _problem, per_token_reference

from muonjax.models.dispatch import gmm_rows, gmm_tiling, routed_experts
from muonjax.parallel.experts import ShardedExperts
from muonjax.parallel.mesh import make_mesh
from muonjax.parallel.tpu import parse_slice, slice_devices

ARGNAMES = ["x", "weights_TK", "gate", "up", "down"]


def _output_and_grads(dispatch, ids, cot):
    """jit of (x, weights, gate, up, down) -> (y, the gradients of sum(y * cot)),
    one program: interpret mode compiles slowly, so forward and backward share it."""

    def both(*args):
        y, vjp = jax.vjp(lambda *a: dispatch(a[0], ids, *a[1:], method="megablox"), *args)
        return y, vjp(jnp.asarray(cot))

    return jax.jit(both)


def _assert_close(got, want, rtol=1e-4):
    y, grads = got
    y_ref, grads_ref = want
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=1e-5 * np.abs(y_ref).max())
    for g, r, name in zip(grads, grads_ref, ARGNAMES):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=1e-5 * np.abs(r).max(), err_msg=name)


def _skewed(x, experts, *rest):
    """Every token's first choice expert 0, its second 1 or 2: experts 3.. empty."""
    experts[:, 1] = 1 + experts[:, 1] % 2
    return (x, experts, *rest)


@pytest.mark.slow
@pytest.mark.parametrize(
    "problem",
    [
        # 160 rows: two 128-row tiles, expert 0's group straddles them
        lambda: _skewed(*_problem(80, 32, 64, 8, 2, "one-expert")),
        # a third of the ids another shard's (== E), their weights not even 0
        lambda: _problem(80, 32, 64, 8, 2, "other-shard"),
        lambda: _problem(1, 32, 64, 8, 2, "uniform"),  # a decode step: 2 rows in 16
    ],
    ids=["skewed-empty-experts", "other-shard", "decode-T1"],
)
def test_megablox_equals_float64_per_token_loop(problem):
    x, experts, weights, gate, up, down, cot = args = problem()
    run = _output_and_grads(routed_experts, jnp.asarray(experts), cot)
    _assert_close(run(x, weights, gate, up, down), per_token_reference(*args))


def test_megablox_tiles_fit_the_dims():
    rows = {1: 16, 2: 16, 16: 16, 17: 32, 128: 128, 129: 256, 12288: 12288}  # n -> padded
    assert {n: gmm_rows(n) for n in rows} == rows
    assert gmm_tiling(16, 32, 64) == (16, 32, 64)  # test presets: whole dims
    assert gmm_tiling(12288, 2048, 1408) == (128, 512, 128)  # Moonlight
    assert gmm_tiling(12288, 1408, 2048) == (128, 128, 512)  # its backward
    assert gmm_tiling(256, 7168, 2048) == (128, 512, 512)  # DeepSeek-V3


@pytest.mark.slow
def test_megablox_in_sharded_experts_equals_one_device():
    """data=4 x expert=2: each device runs its 4 of the 8 experts on its peers'
    tokens, the others' ids masked out (id 4, weight 0) by ShardedExperts."""
    x, experts, weights, gate, up, down, cot = _problem(32, 32, 64, 8, 2, "uniform")
    ids = jnp.asarray(experts)
    sharded = ShardedExperts(make_mesh({"data": 4, "expert": 2, "tensor": 1}))
    args = (x, weights, gate, up, down)
    one_device = _output_and_grads(routed_experts, ids, cot)(*args)
    _assert_close(_output_and_grads(sharded, ids, cot)(*args), one_device, rtol=1e-5)


@pytest.mark.slow
def test_megablox_compiles_to_the_mosaic_kernel_for_tpu():
    """Forward and backward compiled for a v5p chip from this CPU host: the
    nine grouped matmuls (3 gmm forward, 3 gmm + 3 tgmm backward) are Mosaic
    custom calls, and the only loops left are megablox's group-metadata binary
    searches (jnp.histogram in make_group_metadata; none at these shapes),
    no loop over experts or tiles."""
    pytest.importorskip("libtpu")
    T, D, F, E, K = 64, 128, 256, 8, 2
    bf16 = jnp.bfloat16
    shapes = [
        ((T, D), bf16),
        ((T, K), jnp.int32),
        ((T, K), jnp.float32),
        ((E, D, F), bf16),
        ((E, D, F), bf16),
        ((E, F, D), bf16),
    ]

    def forward_backward(x, ids, w, gate, up, down):
        run = lambda x, *a: routed_experts(x, ids, *a, method="megablox")
        y, vjp = jax.vjp(run, x, w, gate, up, down)
        return y, vjp(y)

    mesh = Mesh(np.asarray(slice_devices(parse_slice("v5p-8"))[:1]), ("chip",))
    compiled = (
        jax.jit(forward_backward, in_shardings=NamedSharding(mesh, P()))
        .lower(*(jax.ShapeDtypeStruct(s, dtype) for s, dtype in shapes))
        .compile()
    )
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 9
    assert "conditional(" not in hlo  # platform_dependent kept the TPU branch only
    loops = [line for line in hlo.splitlines() if " while(" in line]
    assert all("jit(searchsorted)" in line for line in loops), loops
