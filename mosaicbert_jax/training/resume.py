"""Resuming a training run: Orbax checkpoints of the train state, data position and model config.

Layout (spelled in `mosaicbert_jax.checkpoint`, whose `load_pretrained` reads it):
<workdir>/checkpoints/<step>/ with items `state` ({"step", "params", "opt_state"}),
`data_state`, `model_config` and `train_config` (JSON; train.steps, the optimizer section and
data.seq_len, so a resume with another total can say what happens to the learning rate and
fill-mask knows the trained length).
With FP8 the state also holds "fp8", the scaling stats stacked one row per tensor; checkpoints
written before they were stacked (one leaf per tensor) are restored and stacked on the fly.
`data_state` is the data iterator's position, the same on every process (each derives its own
rows from it), so process 0 writes it once and every process reads it back.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from mosaicbert_jax import fp8
from mosaicbert_jax.checkpoint import (DATA_STATE_ITEM, MODEL_CONFIG_ITEM, TRAIN_CONFIG_ITEM,
                                       STATE_ITEM, TRAIN_CHECKPOINT_ITEMS, checkpoints_dir,
                                       tree_metadata)


class TrainCheckpoints:
    """Saves asynchronously, keeps the newest `keep`, restores into the given shardings."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = checkpoints_dir(workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=TRAIN_CHECKPOINT_ITEMS,
                                             options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, model_config: dict,
             train_config: Optional[dict] = None) -> None:
        items = {STATE_ITEM: ocp.args.StandardSave(state),
                 DATA_STATE_ITEM: ocp.args.JsonSave(data_state),
                 MODEL_CONFIG_ITEM: ocp.args.JsonSave(model_config)}
        if train_config is not None:
            items[TRAIN_CONFIG_ITEM] = ocp.args.JsonSave(train_config)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _restore_json(self, step: int, item: str) -> Optional[dict]:
        """A JSON item of the checkpoint at `step`, None if that checkpoint has none."""
        if not (epath.Path(self.directory) / str(step) / item).is_dir():
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            item: ocp.args.JsonRestore()}))
        return restored[item]

    def restore_model_config(self, step: int) -> Optional[dict]:
        """The model config (config_to_dict) saved at `step`: checked against the new config
        before the state is restored, so a different model is one clear error."""
        return self._restore_json(step, MODEL_CONFIG_ITEM)

    def restore_train_config(self, step: int) -> Optional[dict]:
        """train.steps, optimizer section and seq_len saved at `step` (None in older ones)."""
        return self._restore_json(step, TRAIN_CONFIG_ITEM)

    def restore_data_state(self, step: int) -> dict:
        """The data position saved at `step`; read first, so that a resume the data layout does
        not allow fails on every process before anything is compiled or restored."""
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            DATA_STATE_ITEM: ocp.args.JsonRestore()}))
        return restored[DATA_STATE_ITEM]

    def saved_fp8_per_tensor(self, step: int) -> bool:
        """Whether the state saved at `step` keeps its FP8 stats one leaf per tensor (the layout
        before they were stacked) rather than fp8.stack_stats' two arrays."""
        tree = tree_metadata(epath.Path(self.directory) / str(step) / STATE_ITEM)
        stats = tree.get("fp8") if isinstance(tree, Mapping) else None
        return isinstance(stats, Mapping) and set(stats) != {"scale", "amax_history"}

    def restore_state(self, step: int, state_like: Any, shardings: Any,
                      fp8_rows: fp8.StatRows = ()) -> Any:
        """Restores state with the structure, dtypes and shardings of `state_like` (any mesh
        and process count: Orbax reshards). fp8_rows (training.step.fp8_stat_rows) lets a
        checkpoint of per-tensor FP8 stats be read and stacked into state_like's layout."""
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like,
            shardings)
        per_tensor = "fp8" in abstract and bool(fp8_rows) and self.saved_fp8_per_tensor(step)
        if per_tensor:
            replicated = shardings["fp8"]["scale"]
            abstract["fp8"] = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                jax.eval_shape(lambda s: fp8.unstack_stats(s, fp8_rows), abstract["fp8"]))
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(abstract)}))[STATE_ITEM]
        if per_tensor:
            restored["fp8"] = jax.jit(lambda t: fp8.stack_stats(t, fp8_rows),
                                      out_shardings=shardings["fp8"])(restored["fp8"])
        return restored

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
