"""What a resume must agree on with the checkpoint it resumes, said in one line before anything
is restored: the same model, a train.steps not below the checkpoint, and what a new total does
to the learning-rate schedule.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections

from mosaicbert_jax import fp8
from mosaicbert_jax.cli_errors import UserError
from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.optim import recipe_optimizer

# The fields that fix the parameters' shapes: a resume must keep them.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                "intermediate_size", "type_vocab_size")
_PRESETS = ("tiny", "base", "large")


def _preset_of(sizes: dict[str, Any]) -> Optional[str]:
    """The preset whose sizes (vocab aside) `sizes` has, if any."""
    for name in _PRESETS:
        preset = MosaicBertConfig.from_preset(name)
        if all(sizes.get(f) == getattr(preset, f) for f in SHAPE_FIELDS if f != "vocab_size"):
            return name
    return None


def check_same_model(saved: Optional[dict[str, Any]], new: dict[str, Any], preset: str,
                     step: int, workdir: str) -> None:
    """Raises a UserError naming what differs when `saved` (the checkpoint's model_config)
    has other parameter shapes than `new` (the config's model)."""
    if saved is None:
        return
    differs = [f"{f} {saved.get(f)} (checkpoint) vs {new.get(f)} (config)"
               for f in SHAPE_FIELDS if saved.get(f) != new.get(f)]
    if not differs:
        return
    saved_preset = _preset_of(saved)
    presets = (f"preset={saved_preset} (checkpoint) vs preset={preset} (config); "
               if saved_preset and saved_preset != preset else "")
    same = (f"--config.model.preset={saved_preset}" if saved_preset and saved_preset != preset
            else "the model settings it was trained with")
    raise UserError(
        f"--workdir={workdir} holds a checkpoint (step {step}) of a different model: {presets}"
        f"{', '.join(differs)}. Resume it with the same model ({same}), or start the new "
        f"model in a new --workdir; the checkpoints are left as they are")


def check_same_fp8(saved: Optional[dict[str, Any]], new: dict[str, Any], step: int,
                   workdir: str) -> None:
    """FP8 on or off (and its history length, and whether the MLP alone is FP8) must match the
    checkpoint: its train state holds the FP8 scaling stats exactly when it was trained with
    FP8, laid out by fp8_gemm."""
    if saved is None:
        return
    was, now = bool(saved.get("fp8", False)), bool(new.get("fp8", False))
    if was != now:
        raise UserError(
            f"--workdir={workdir} holds a checkpoint (step {step}) trained with fp8={was}, but "
            f"the config has fp8={now}; resume it with --config.model.fp8={was}, or start the "
            f"new setting in a new --workdir (continued pretraining: --config.init_from)")
    if now and saved.get("fp8_amax_history") != new.get("fp8_amax_history"):
        raise UserError(
            f"--workdir={workdir} holds a checkpoint (step {step}) with fp8_amax_history="
            f"{saved.get('fp8_amax_history')}, but the config has "
            f"{new.get('fp8_amax_history')}; resume it with "
            f"--config.model.fp8_amax_history={saved.get('fp8_amax_history')}")
    # "f8" and "qdq" keep one stats group per dense layer, "mlp" two per MLP, "mlp_qkv" those
    # and Wqkv's, "encoder" also the attention output's: the train states differ. Checkpoints from before fp8_gemm existed used "f8".
    saved_gemm, new_gemm = saved.get("fp8_gemm", "f8"), new.get("fp8_gemm", "f8")
    if now and fp8.stats_layout(saved_gemm) != fp8.stats_layout(new_gemm):
        raise UserError(
            f"--workdir={workdir} holds a checkpoint (step {step}) trained with fp8_gemm="
            f"{saved_gemm!r}, whose FP8 stats do not fit fp8_gemm={new_gemm!r}; resume it with "
            f"--config.model.fp8_gemm={saved_gemm}, or start a new --workdir")


def check_steps(start: int, total: int, workdir: str) -> None:
    """A train.steps below the checkpoint's step cannot be resumed."""
    if start > total:
        raise UserError(
            f"--workdir={workdir} holds a checkpoint at step {start}, past "
            f"train.steps={total}; set --config.train.steps to at least {start} to resume it, "
            f"or use a new --workdir to train {total} steps from scratch")


def already_trained_message(start: int, workdir: str) -> str:
    return (f"already trained: --workdir={workdir} holds the final checkpoint (step {start} of "
            f"train.steps={start}); nothing to do. To train further, raise "
            f"--config.train.steps (the learning-rate decay is then recomputed over the new "
            f"total), or use a new --workdir for a new run")


def train_config_item(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the train_config item of a checkpoint holds."""
    return {"train_steps": int(config.train.steps), "optimizer": config.optimizer.to_dict(),
            "seq_len": int(config.data.seq_len)}


def schedule_change_message(saved: Optional[dict[str, Any]], start: int, total: int,
                            optimizer: ml_collections.ConfigDict) -> Optional[str]:
    """When the saved run had another total or optimizer: the learning rate of the last step
    trained (old schedule) and of the next one (new schedule), so the jump is visible."""
    if saved is None:
        return None
    new = {"train_steps": int(total), "optimizer": optimizer.to_dict()}
    if all(saved.get(k) == v for k, v in new.items()):
        return None
    old_schedule, _ = recipe_optimizer(ml_collections.ConfigDict(saved["optimizer"]),
                                       saved["train_steps"])
    new_schedule, _ = recipe_optimizer(optimizer, total)
    before, after = float(old_schedule(start - 1)), float(new_schedule(start))
    changed = []
    if saved["train_steps"] != total:
        changed.append(f"train.steps {saved['train_steps']} -> {total}")
    changed += [f"optimizer.{k} {v} -> {new['optimizer'].get(k)}"
                for k, v in sorted(saved["optimizer"].items()) if new["optimizer"].get(k) != v]
    return (f"note: resuming step {start} with {', '.join(changed)}: the warmup and linear "
            f"decay are recomputed over {total} steps, so the learning rate goes from "
            f"{before:.3g} (step {start}) to {after:.3g} (step {start + 1}). To keep the old "
            f"schedule, resume with the settings it was trained with")
