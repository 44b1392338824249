"""TPU slices without a TPU: their devices from libtpu's topology description,
for the TPU compiler to compile for on any machine (`muonjax inspect --tpu`).

A slice is named as Cloud TPU names it (`v5p-64`, `v5e-256`, `v6e-64`) or by
its chip grid (`v5p:4x4x4`, `v6e:8x8`). v5p counts TensorCores in its name, two
per chip (v5p-64 is 32 chips, one JAX device each); v5e and v6e count chips.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import pathlib
import pkgutil
import re

INSTALL_HINT = "pip install 'muonjax[tpu]'"


class TPUError(ValueError):
    """A slice name that is not one, or no libtpu: one clear line at the CLI."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's datasheet figures (Cloud TPU documentation)."""

    hbm_bytes: int
    bf16_flops: float  # peak bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, all its links one way
    dims: int  # of its slices' chip grid
    cores_per_chip_in_name: int  # v5p-N counts TensorCores, v5e-N / v6e-N chips


GiB = 1024**3
CHIPS = {
    "v5e": Chip(16 * GiB, 197e12, 819e9, 200e9, 2, 1),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, 600e9, 3, 2),
    "v6e": Chip(32 * GiB, 918e12, 1640e9, 448e9, 2, 1),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    generation: str  # a key of CHIPS
    grid: tuple[int, ...]  # chips along each axis of the slice's torus

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def topology(self) -> str:
        """libtpu's topology name: "v5p:2x4x4"."""
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def name(self) -> str:
        """Cloud TPU's name: "v5p-64"."""
        return f"{self.generation}-{self.chips * self.chip.cores_per_chip_in_name}"


def parse_slice(text: str) -> Slice:
    """`v5p-64` or `v5p:2x4x4` (see the module docstring) -> Slice."""
    gens = ", ".join(CHIPS)
    usage = f"--tpu {text!r}: expected GEN-N (e.g. v5p-64, v5e-256) or GEN:AxB[xC] with GEN one of {gens}"
    named = re.fullmatch(r"(v\w+?)-(\d+)", text.strip())
    grid = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)*)", text.strip())
    gen = (named or grid).group(1) if (named or grid) else None
    if gen not in CHIPS:
        raise TPUError(usage)
    chip = CHIPS[gen]
    if grid:
        dims = tuple(int(d) for d in grid.group(2).split("x"))
        if len(dims) != chip.dims or min(dims) < 1:
            raise TPUError(f"--tpu {text!r}: a {gen} slice's grid has {chip.dims} axes")
        return Slice(gen, dims)
    count = int(named.group(2))
    chips, rest = divmod(count, chip.cores_per_chip_in_name)
    smallest = 1 if chip.dims == 2 else 4
    if rest or chips < smallest or chips & (chips - 1):
        unit = "TensorCores (two per chip)" if chip.cores_per_chip_in_name == 2 else "chips"
        raise TPUError(
            f"--tpu {text!r}: {gen}-N counts {unit}; N must give a power-of-two number of "
            f"chips, at least {smallest}"
        )
    return Slice(gen, _default_grid(chips, chip.dims))


def _default_grid(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's slice shape for a power-of-two chip count: from 1x1 (2-D)
    or 2x2x1 (3-D), doubling the last of the smallest axes each time
    (v5e-8 2x4, v5e-32 4x8; v5p-32 2x2x4, v5p-64 2x4x4, v5p-128 4x4x4)."""
    grid = [1, 1] if dims == 2 else [2, 2, 1]
    while math.prod(grid) < chips:
        grid[max(i for i, g in enumerate(grid) if g == min(grid))] *= 2
    return tuple(grid)


def libtpu_version() -> str | None:
    """The installed libtpu's version, None without one."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("libtpu")
    except PackageNotFoundError:
        return "unknown"


def slice_devices(tpu: Slice) -> list:
    """The JAX devices of `tpu`, one per chip, from libtpu's topology
    description: compile for them with jax.jit(...).lower(...).compile();
    nothing runs. Works on any machine with libtpu installed."""
    if libtpu_version() is None:
        raise TPUError(f"compiling for a TPU needs libtpu: {INSTALL_HINT}")
    # Without a TPU at hand libtpu asks the cloud metadata server what it runs
    # on, and logs errors when no answer comes: these say it. Only compiling,
    # several processes may load libtpu at once (its lock guards a TPU's use).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology).devices)


def skip_absent_tpu() -> None:
    """With libtpu installed (the dev extra) on a machine with neither a TPU
    nor a GPU plugin, JAX would start a TPU backend, which fails after libtpu
    logs errors, and run on the CPU: go to the CPU at once. Call before the
    backend starts; JAX_PLATFORMS (or jax_platforms) given wins."""
    if os.environ.get("JAX_PLATFORMS") or libtpu_version() is None or _tpu_attached():
        return
    if _accelerator_plugins():
        return  # a GPU's plugin: JAX's own choice, CPU only if it fails
    import jax

    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def _tpu_attached() -> bool:
    """A TPU chip on this machine's PCI bus (Google's vendor id), as JAX looks for one."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if pathlib.Path(vendor).read_text().strip() == "0x1ae0":
                return True
        except OSError:
            continue
    return False


def _accelerator_plugins() -> list[str]:
    """The PJRT plugins JAX would load (jax_plugins modules and entry points)."""
    from importlib.metadata import entry_points

    names = [e.name for e in entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    return names
