"""`muonjax inspect`: the train step compiled from abstract shapes (nothing
allocated), and what it costs each device: memory, FLOPs, communication."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

import muonjax
from muonjax.models import flops_per_token, param_counts
from muonjax.optim.distributed import spread_flops
from muonjax.parallel import hlo
from muonjax.parallel.mesh import format_mesh
from muonjax.parallel.tpu import Slice, libtpu_version
from muonjax.train.config import TrainConfig
from muonjax.train.optimizers import ns_dtype
from muonjax.train.program import Program, build


def shard_bytes(shapes, shardings) -> int:
    """Bytes one device holds of `shapes` laid out by `shardings`."""
    return sum(
        math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
        for a, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True)
    )


def muon_leaves(params, where=lambda path, leaf: True) -> list[tuple[Any, Any]]:
    """(path, leaf) of each Muon leaf, a stack of matrices (or of those
    `where(path, leaf)` selects)."""
    labels = jax.tree.leaves(muonjax.moonlight_labels(params))
    return [
        (path, p)
        for (path, p), label in zip(jax.tree_util.tree_leaves_with_path(params), labels)
        if label == "muon" and where(path, p)
    ]


def newton_schulz_total(
    params, where=lambda path, leaf: True, ns_steps: int = 5, compute_dtype="float32"
) -> int:
    """Newton-Schulz FLOPs of one step over the whole model (every Muon matrix
    once), or over the leaves `where(path, leaf)` selects."""
    return sum(
        muonjax.newton_schulz_flops(p.shape, ns_steps, compute_dtype)
        for _, p in muon_leaves(params, where)
    )


def optimizer_cost(program: Program) -> dict:
    """Per-device cost of the optimizer update alone, on the shardings the step
    gives it (XLA's cost analysis: "flops", "bytes accessed"). Its program has
    no loops, so XLA's counts are exact (Newton-Schulz and the elementwise work)."""
    params, opt_state = program.shapes.params, program.shapes.opt_state
    grads_sharding = program.plan.state_like if program.plan.zero1 else program.plan.params
    update = jax.jit(
        program.tx.update,
        in_shardings=(grads_sharding, program.shardings.opt_state, program.plan.params),
        out_shardings=(program.plan.params, program.shardings.opt_state),
    )
    return update.lower(params, opt_state, params).compile().cost_analysis()


def optimizer_flops(program: Program) -> float:
    """Per-device FLOPs of the optimizer update (`optimizer_cost`)."""
    return float(optimizer_cost(program)["flops"])


def step_costs(config: TrainConfig, mesh: jax.sharding.Mesh) -> dict:
    """What one train step of `config` on `mesh` costs each device, compiled from
    abstract shapes: memory (parameters, optimizer state, peak), FLOPs (model,
    optimizer, Newton-Schulz) and the bytes its collectives move."""
    model_config = config.model_config()
    program = build(config, model_config, mesh)
    devices = mesh.size
    started = time.perf_counter()
    compiled = _compiled_step(config, program)
    compile_seconds = time.perf_counter() - started
    params, opt_state = program.shapes.params, program.shapes.opt_state
    update = optimizer_cost(program)
    update_flops = float(update["flops"])
    tokens = config.batch_size * config.seq_len
    model_flops = flops_per_token(model_config, config.seq_len) * tokens / devices
    ns_total, ns_per_device = newton_schulz_costs(config, program, mesh)
    comm = hlo.collective_bytes(compiled.as_text(), devices)
    xla_cost = compiled.cost_analysis() or {}
    counts = param_counts(model_config)
    return {
        "preset": config.preset,
        "optimizer": config.optimizer,
        "mesh": format_mesh(mesh),
        "zero1": program.plan.zero1,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        # the global batch's rows per forward/backward pass; peak memory follows it
        "micro_batch_size": config.batch_size // config.grad_accum,
        "seq_len": config.seq_len,
        "parameters": counts["total"],
        "param_bytes": shard_bytes(params, program.plan.params),
        "opt_state_bytes": shard_bytes(opt_state, program.shardings.opt_state),
        "peak_bytes": _peak_bytes(compiled),
        "memory_bytes": _memory_bytes(compiled),
        "step_flops": float(model_flops + update_flops),
        "model_flops": float(model_flops),
        "optimizer_flops": update_flops,
        "optimizer_bytes_accessed": float(update["bytes accessed"]),
        "remat": model_config.remat,
        "newton_schulz_flops_whole_model": float(ns_total),
        # on the busiest device, padding included; ideal: whole model / devices
        "newton_schulz_flops_per_device": float(ns_per_device),
        "collective_bytes": comm["bytes"],
        "collective_instructions": comm["instructions"],
        "collectives_in_loops_of_unknown_trip_count": comm["in_loops_of_unknown_trip_count"],
        "devices": devices,
        "platform": mesh.devices.flat[0].platform,
        # XLA's own count of the compiled step, per device: a loop's body counted
        # once (the micro-batches' and the layers' scans), so not the step's total
        "xla_flops": float(xla_cost.get("flops", 0.0)),
        "xla_bytes_accessed": float(xla_cost.get("bytes accessed", 0.0)),
        "compile_seconds": round(compile_seconds, 1),
    }


def _compiled_step(config: TrainConfig, program: Program):
    """The train step compiled for a batch of `config`'s shape (nothing allocated)."""
    batch = jax.ShapeDtypeStruct(
        (config.batch_size, config.seq_len + 1), jnp.int32, sharding=program.batch
    )
    return program.step.lower(program.abstract(), batch).compile()


def _peak_bytes(compiled) -> int:
    """Bytes one device holds at the step's peak, by XLA's memory analysis."""
    memory = compiled.memory_analysis()
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    peak -= memory.alias_size_in_bytes  # donated state: inputs reused as outputs
    return int(peak)


def _memory_bytes(compiled) -> dict[str, int]:
    """XLA's memory analysis, per device: arguments, outputs, temporaries, the
    donated inputs reused as outputs, and the program itself."""
    m = compiled.memory_analysis()
    return {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }


# the model's FLOPs done per step over those counted: remat "full" runs each
# layer's forward again in the backward pass (forward 1 + backward 2 + 1)
RECOMPUTE = {"none": 1.0, "dots": 1.0, "full": 4 / 3}


def on_chip(report: dict, tpu: Slice) -> dict:
    """`report` (step_costs of a step compiled for `tpu`'s chips) against one
    chip's datasheet: does the peak fit its HBM, and a roofline ESTIMATE of the
    step's time, none of it overlapped: the model's FLOPs (PaLM's count, with
    remat's recomputation) at peak FLOP/s; the optimizer update's (XLA's exact
    count: FLOPs at peak, or bytes at HBM bandwidth, the larger); the
    collectives' bytes at ICI bandwidth. A bound to compare configurations by,
    not a measured time (XLA's own step counts see each loop body once)."""
    chip = tpu.chip
    model = report["model_flops"] * RECOMPUTE[report["remat"]] / chip.bf16_flops
    optimizer = max(
        report["optimizer_flops"] / chip.bf16_flops,
        report["optimizer_bytes_accessed"] / chip.hbm_bandwidth,
    )
    network = sum(report["collective_bytes"].values()) / chip.ici_bandwidth
    step = model + optimizer + network
    return {
        "tpu": tpu.name,
        "topology": tpu.topology,
        "libtpu": libtpu_version(),
        "hbm_bytes": chip.hbm_bytes,
        "fits": report["peak_bytes"] <= chip.hbm_bytes,
        "hbm_used": round(report["peak_bytes"] / chip.hbm_bytes, 4),
        "estimate_model_seconds": model,
        "estimate_optimizer_seconds": optimizer,
        "estimate_collective_seconds": network,
        "estimate_step_seconds": step,
        "estimate_optimizer_share": optimizer / step,
    }


def newton_schulz_costs(config: TrainConfig, program: Program, mesh) -> tuple[int, int]:
    """Newton-Schulz FLOPs of one step: over the whole model, and on the busiest
    device (0 and 0 for AdamW)."""
    if config.optimizer != "muon":
        return 0, 0
    params = program.shapes.params
    dtype = ns_dtype(config, mesh.devices.flat[0].platform)
    ns_total = newton_schulz_total(params, ns_steps=config.ns_steps, compute_dtype=dtype)
    if not program.plan.zero1:
        return ns_total, ns_total
    # Distributed Muon spreads whole matrices over every device (with ZeRO-1),
    # starting from the state's layout
    leaves = muon_leaves(params)
    return ns_total, spread_flops(
        [p.shape for _, p in leaves],
        dict(mesh.shape),
        config.ns_steps,
        [program.plan.state_spec(path, p) for path, p in leaves],
        dtype,
    )
