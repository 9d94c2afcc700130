"""Training checkpoints (orbax): save every so often, resume from the newest after a kill.

Orbax writes each step into a temporary directory and renames it when complete, so a job killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os

import jax
import numpy as np


class Checkpointer:
    """Keeps the newest ``max_to_keep`` checkpoints of a training state pytree in ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state) -> None:
        self._manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, state_like, step: int | None = None, sharding: jax.sharding.Sharding | None = None):
        """Restores the checkpoint at ``step`` (default: newest) into the structure of ``state_like``.

        ``sharding`` places every restored array (e.g. replicated over a mesh), so a checkpoint written
        on 8 devices restores on 1; None keeps the saved sharding, which needs the devices it was saved on.
        """
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state_like
        )
        return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()
