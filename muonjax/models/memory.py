"""Will it fit: a model's bytes from its config alone (nothing is allocated),
against the memory of the devices that would hold it. Checked before anything
is built, so that an absurd config (10^9 layers, 10^7 experts) is one clear
error instead of minutes of allocation and a MemoryError."""

from __future__ import annotations

import os
import resource

import jax

from muonjax.models.config import ModelConfig
from muonjax.models.counts import param_counts

PARAM_BYTES = 4  # parameters are float32 whatever the compute dtype
GIB = 2**30


class TooLarge(ValueError):
    """The model cannot fit in the devices' memory."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is XLA's RESOURCE_EXHAUSTED: a device ran out of memory."""
    return isinstance(error, jax.errors.JaxRuntimeError) and str(error).startswith(
        "RESOURCE_EXHAUSTED"
    )


def host_available_bytes() -> int:
    """Memory this process can still take on the host: the least of the
    kernel's MemAvailable, the cgroup's limit and the address-space rlimit."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    if not limits and hasattr(os, "sysconf"):
        limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits) if limits else 2**63


def devices_bytes(devices) -> int:
    """What `devices` can hold together: each accelerator's own memory
    (memory_stats' bytes_limit); CPU devices share their host's, counted once a
    host. Only this process's devices can be read: on several hosts, the others'
    are taken to be alike (a run's hosts are)."""
    devices = list(devices)
    mine = [d for d in devices if d.process_index == jax.process_index()]
    total, host = 0, False
    for device in mine:
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            total += int(stats["bytes_limit"])
        else:
            host = True
    hosts = len({d.process_index for d in devices})
    scale = len(devices) / len(mine) if mine else 0
    return int(total * scale) + (host_available_bytes() * hosts if host else 0)


def check_fits(config: ModelConfig, devices, *, copies: int = 1, what: str = "the model") -> int:
    """TooLarge unless `copies` float32 copies of the model's parameters fit in
    `devices` together (a lower bound on what using it needs: the parameters
    alone for inference, more for training); returns the bytes counted."""
    need = param_counts(config)["total"] * PARAM_BYTES * copies
    have = devices_bytes(devices)
    if need > have:
        kind = devices[0].platform if devices else "no"
        raise TooLarge(
            f"{what} needs at least {need / GIB:,.1f} GiB ({param_counts(config)['total']:,} "
            f"float32 parameters x {copies}), more than the {have / GIB:,.1f} GiB that "
            f"{len(devices)} {kind} device{'s' if len(devices) != 1 else ''} can hold"
        )
    return need
