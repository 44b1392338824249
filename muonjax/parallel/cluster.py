"""Joining a multi-host run: explicit coordinates, or the cluster JAX detects.

`jax.distributed.initialize()` without arguments reads the coordinator,
process count and process index from a cluster's environment: Cloud TPU pods
(GCE and GKE), SLURM (`srun`), Open MPI (`mpirun`) and Kubernetes. `start`
does the same when no coordinates are given, and leaves a single machine
alone. Must run before anything starts JAX's backend.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax


def simulate_cpu_devices(count: int) -> None:
    """`count` CPU devices in this process (a pod's mesh simulated on one host),
    with a thread pool big enough for their collectives. Must run before
    anything starts JAX's backend.

    XLA's CPU client runs every device's program on one pool of
    max(cores, devices) threads, and a device can wait in two collectives at
    once (one inside a loop or branch while the other runs beside it). With
    exactly one thread per device, the last device then finds no thread for
    its part and XLA aborts the process after 40 s ("Termination timeout ...
    only 7 of 8 arrived"): on a 2-core machine an AdamW SFT step on 8 devices
    did so 4 runs in 4. Two threads per device (PJRT_NPROC, which the client
    reads when it starts; set here, so processes started later inherit it)
    removed it.
    """
    jax.config.update("jax_num_cpu_devices", count)
    os.environ["PJRT_NPROC"] = str(max(2 * count, os.cpu_count() or 1))


class ClusterError(ValueError):
    """Inconsistent multi-host settings (a user error: the CLI exits 2)."""


@dataclasses.dataclass(frozen=True)
class Joined:
    how: str  # "flags" or the cluster environment's name (slurm, ompi, gce_tpu, gke_tpu, k8s)
    process_index: int
    process_count: int

    def summary_line(self) -> str:
        """This process's place in the run and the devices it sees, in one line."""
        return (
            f"process {self.process_index} of {self.process_count} ({self.how}): "
            f"{jax.local_device_count()} local devices of {jax.device_count()} "
            f"({jax.devices()[0].platform})"
        )


def detected_cluster():
    """The cluster environment `jax.distributed.initialize()` would use, or None.

    JAX keeps its detectors private (jax._src.clusters); they are asked in its
    own order, the opt-in ones (mpi4py) skipped as JAX skips them. A JAX whose
    detectors moved detects nothing: pass the coordinates instead.
    """
    try:
        from jax._src.clusters import ClusterEnv

        kinds = list(ClusterEnv._cluster_types)
    except (ImportError, AttributeError):
        return None
    with warnings.catch_warnings():  # k8s's "install jax[k8s]" on any Kubernetes pod
        warnings.simplefilter("ignore")
        for env in kinds:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                return env
    return None


def start(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> Joined | None:
    """Joins the multi-host run: by the coordinates given (all three), else by
    the detected cluster's own (a job of one process is left alone). Returns
    how it joined, or None on a single machine. CPU collectives use gloo (the
    accelerators' own collectives are not affected)."""
    if coordinator or num_processes is not None or process_id is not None:
        if not coordinator or num_processes is None or process_id is None:
            raise ClusterError(
                "--coordinator, --num-processes and --process-id go together (or none of "
                "them, to use the cluster's own: SLURM, Open MPI, Cloud TPU, Kubernetes)"
            )
        if not 0 <= process_id < num_processes:
            raise ClusterError(
                f"--process-id {process_id} is not in [0, --num-processes {num_processes})"
            )
        how = "flags"
    else:
        env = detected_cluster()
        if env is None:
            return None
        if env.name in ("slurm", "ompi") and env.get_process_count() == 1:
            return None  # e.g. one `srun` task: nothing to join
        how = env.name
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if how == "flags":
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return Joined(how, jax.process_index(), jax.process_count())
