"""orbax checkpoints of a run: the train state, and metadata (config, step and
the data iterator's state, which is the same on every process).

Saves are asynchronous (the step loop continues while files are written) and
atomic: a save killed half-way leaves a tmp folder that latest_step() ignores,
so a resumed run starts from the last complete checkpoint.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: pathlib.Path, keep: int):
        self._manager = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Starts writing; returns once the arrays are copied off the devices."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(self, step: int, abstract_state):
        """The state laid out as `abstract_state` says (shapes, dtypes, shardings:
        it may be another mesh, or another number of processes, than the one
        saved from), and the metadata."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry the shardings a restore should produce."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
