"""The train step as XLA compiles it on CPU: with the `tiles` expert dispatch
it runs no loop at all (the layer scans are one layer each here and vanish),
so XLA's cost analysis counts every FLOP, and the count is within 10% of the
model's own (`flops_per_token`: 6 x active matmul parameters + attention)."""

import re

import jax
import jax.numpy as jnp

from muonjax.models import preset
from muonjax.models.counts import flops_per_token
from muonjax.parallel import make_mesh, parse_mesh
from muonjax.train import TrainConfig
from muonjax.train.program import build

# `tiny` widened so that matmuls, not the elementwise work, are most of the FLOPs
MODEL = preset("tiny").replace(
    d_model=256, intermediate_size=1024, moe_intermediate_size=256, n_heads=8,
    qk_nope_head_dim=32, v_head_dim=32,
)  # fmt: skip
BATCH, SEQ = 8, 128


def _compiled_step(dispatch: str):
    config = TrainConfig(optimizer="adamw", batch_size=BATCH, seq_len=SEQ)
    model = MODEL.replace(moe_dispatch=dispatch)
    program = build(config, model, make_mesh(parse_mesh("data=1"), jax.devices()[:1]))
    tokens = jnp.zeros((BATCH, SEQ + 1), jnp.int32)
    return program.step.lower(program.init(), tokens).compile()


def _loops(compiled) -> int:
    return sum(bool(re.search(r"= .*\bwhile\(", line)) for line in compiled.as_text().splitlines())


def test_tiles_step_has_no_loop_and_xla_counts_the_model_flops():
    compiled = _compiled_step("tiles")
    assert _loops(compiled) == 0
    ratio = compiled.cost_analysis()["flops"] / (flops_per_token(MODEL, SEQ) * BATCH * SEQ)
    assert 0.9 <= ratio <= 1.1, ratio  # measured 1.06


def test_blocks_step_loops_over_blocks():
    """The contrast that shows the loop check can fail: `blocks` loops (a trip
    count that depends on the routing), which XLA's count cannot see into."""
    assert _loops(_compiled_step("blocks")) > 0
