"""Orbax checkpoints of a training run: train state, data-iterator state and model config.

Layout (what `mosaicbert_jax.checkpoint.load_pretrained` reads): <workdir>/checkpoints/<step>/
with items `state` ({"step", "params", "opt_state"}), `data_state` and `model_config` (JSON).
`data_state` is the data iterator's position, the same on every process (each derives its own
rows from it), so process 0 writes it once and every process reads it back.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data_state", "model_config")


class TrainCheckpoints:
    """Saves asynchronously, keeps the newest `keep`, restores into the given shardings."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, model_config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(data_state),
            model_config=ocp.args.JsonSave(model_config)), force=True)

    def restore_data_state(self, step: int) -> dict:
        """The data position saved at `step`; read first, so that a resume the data layout does
        not allow fails on every process before anything is compiled or restored."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            data_state=ocp.args.JsonRestore()))
        return restored["data_state"]

    def restore_state(self, step: int, state_like: Any, shardings: Any) -> Any:
        """Restores state with the structure, dtypes and shardings of `state_like` (any mesh
        and process count: Orbax reshards)."""
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like,
            shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
