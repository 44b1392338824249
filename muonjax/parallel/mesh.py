"""Device meshes with named axes `data`, `expert` and `tensor`."""

from __future__ import annotations

import math

import jax
import numpy as np

AXES = ("data", "expert", "tensor")
# The batch is split over these: the expert axis is a data-parallel axis for
# everything but the experts.
BATCH_AXES = ("data", "expert")


class MeshError(ValueError):
    """A mesh that does not fit the devices or the model: one clear line at the CLI."""


def parse_mesh(text: str | None) -> dict[str, int]:
    """ "data=4,expert=2" -> {"data": 4, "expert": 2, "tensor": 1}; None or "" -> all devices on data."""
    sizes = dict.fromkeys(AXES, 1)
    if not text:
        sizes["data"] = jax.device_count()
        return sizes
    given = set()
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        # ASCII digits only: str.isdigit() also accepts "²", which int() refuses
        if (
            not eq
            or name not in AXES
            or not value.isascii()
            or not value.isdigit()
            or int(value) < 1
        ):
            raise MeshError(
                f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(AXES)} "
                "and SIZE a positive integer"
            )
        if name in given:
            raise MeshError(f"--mesh {text!r}: axis {name} is given twice")
        given.add(name)
        sizes[name] = int(value)
    return sizes


def run_mesh(
    text: str | None, batch_size: int, grad_accum: int = 1, devices=None
) -> jax.sharding.Mesh:
    """A run's mesh from --mesh `text`, parsed (`parse_mesh`), made over
    `devices` (`make_mesh`) and checked against the batch (`check_batch`): the
    one place a run's mesh is made and checked."""
    mesh = make_mesh(parse_mesh(text), devices)
    check_batch(batch_size, mesh, grad_accum)
    return mesh


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
    """The mesh (data, expert, tensor) over `devices` (default: all); its size
    must be their number."""
    total = math.prod(sizes.values())
    count = jax.device_count() if devices is None else len(devices)
    if total != count:
        shape = ",".join(f"{k}={v}" for k, v in sizes.items())
        raise MeshError(f"--mesh {shape} has {total} devices but there are {count}")
    shape = tuple(sizes[a] for a in AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    if devices is None:
        return jax.make_mesh(shape, AXES, axis_types=axis_types)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, grad_accum: int = 1) -> None:
    """Each device's rows (batch / data x expert) must split into grad_accum micro-batches."""
    data_parallel = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % data_parallel:
        raise MeshError(
            f"--batch-size {batch_size} is not divisible by the data-parallel size {data_parallel} (data x expert)"
        )
    rows = batch_size // data_parallel
    if rows % grad_accum:
        raise MeshError(
            f"--batch-size {batch_size} gives {rows} rows per device over the data-parallel "
            f"size {data_parallel} (data x expert), which --grad-accum {grad_accum} does not "
            f"divide: use a multiple of {data_parallel * grad_accum}"
        )


def format_mesh(mesh: jax.sharding.Mesh) -> str:
    """`mesh` as --mesh spells it, every axis named: "data=8,expert=1,tensor=1"."""
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
