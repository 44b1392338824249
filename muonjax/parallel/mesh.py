"""Device meshes with named axes `data`, `expert` and `tensor`."""

from __future__ import annotations

import math

import jax
import numpy as np

AXES = ("data", "expert", "tensor")


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


def describe(mesh: jax.sharding.Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
