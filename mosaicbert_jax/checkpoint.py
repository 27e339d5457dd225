"""Saving and loading MosaicBERT weights, and the one spelling of the on-disk layouts.

`save_pretrained` writes a pretrained folder. Layouts `load_pretrained` reads:
  * a pretrained folder written by `save_pretrained`: `config.json` + Orbax `params/`;
  * a training workdir (holding `checkpoints/`), its `checkpoints/` folder (latest step is
    used) or one step folder `checkpoints/<step>` of the training CheckpointManager, whose
    items are `state` ({"params", "opt_state", "step"}), `model_config`, `data_state` and
    `train_config` (train.steps, the optimizer section and data.seq_len; absent in older
    checkpoints);
  * a PyTorch folder (`config.json` + `model.safetensors` or `pytorch_model.bin`), converted
    on the fly by `mosaicbert_jax.param_layout`.
The training workdir's names (`checkpoints/`, the items of a step) are defined here and used
by `mosaicbert_jax.training.resume`, which writes them.
Only the parameters are restored, never the optimizer state, as numpy arrays on the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.param_layout import (CONFIG_FILE, TORCH_WEIGHT_FILES, Params,
                                         check_flax_params, config_from_hf_json,
                                         infer_model_kind, read_torch_folder,
                                         torch_state_dict_to_flax, unwrap_variables)

# A pretrained folder: CONFIG_FILE (config fields + model_kind) and the Orbax params tree.
PARAMS_DIR = "params"
# A training workdir: <workdir>/CHECKPOINTS_DIR/<step>/ with these Orbax items.
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"            # {"step", "params", "opt_state"}
DATA_STATE_ITEM = "data_state"  # the data iterators' position (JSON)
MODEL_CONFIG_ITEM = "model_config"  # config_to_dict of the model (JSON)
TRAIN_CONFIG_ITEM = "train_config"  # train.steps, optimizer section, seq_len (JSON)
TRAIN_CHECKPOINT_ITEMS = (STATE_ITEM, DATA_STATE_ITEM, MODEL_CONFIG_ITEM, TRAIN_CONFIG_ITEM)
# Files a tokenizer may come as; copied along with weights when present.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
# Keys save_pretrained adds to config.json next to the config fields; config_from_dict skips them.
_FILE_METADATA_KEYS = ("model_kind",)
_DTYPE_FIELDS = ("dtype", "param_dtype")


def config_to_dict(config: MosaicBertConfig) -> dict[str, Any]:
    """Every field of the config as JSON-safe values (dtypes as their names, e.g. 'bfloat16')."""
    values = dataclasses.asdict(config)
    for name in _DTYPE_FIELDS:
        values[name] = np.dtype(values[name]).name
    return values


def config_from_dict(values: dict[str, Any]) -> MosaicBertConfig:
    """Inverse of `config_to_dict`. Unknown keys raise (they mean a different code version)."""
    known = {field.name for field in dataclasses.fields(MosaicBertConfig)}
    fields = {k: v for k, v in values.items() if k not in _FILE_METADATA_KEYS}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown MosaicBertConfig keys {unknown}; known keys are "
                         f"{sorted(known)}. Was this config written by another version?")
    return MosaicBertConfig(**fields)


def _abs_path(path: str | os.PathLike) -> epath.Path:
    """Orbax wants absolute paths; remote ones (gs://...) already are."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _tokenizer_target_name(source: epath.Path) -> str:
    """Keeps well-known tokenizer names; otherwise names the copy by what it holds."""
    if source.name in TOKENIZER_FILES:
        return source.name
    if source.suffix == ".json":
        return "tokenizer.json"
    if source.suffix == ".txt":
        return "vocab.txt"
    return source.name


def copy_tokenizer_file(tokenizer_file: str | os.PathLike, directory: str | os.PathLike) -> str:
    """Copies a tokenizer file into `directory` under a name Hugging Face tools recognise."""
    source = epath.Path(tokenizer_file)
    if not source.is_file():
        raise ValueError(f"tokenizer file {os.fspath(tokenizer_file)!r} does not exist")
    target = epath.Path(directory) / _tokenizer_target_name(source)
    target.write_bytes(source.read_bytes())
    return target.name


def find_tokenizer_files(directory: str | os.PathLike) -> list[epath.Path]:
    """The well-known tokenizer files present in `directory`."""
    directory = epath.Path(directory)
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def save_pretrained(directory: str, params: Params, config: MosaicBertConfig,
                    tokenizer_file: Optional[str] = None) -> None:
    """Writes `config.json` (config + model_kind), Orbax `params/` and the tokenizer file."""
    directory = _abs_path(directory)
    if (directory / PARAMS_DIR).exists():
        raise ValueError(f"{directory / PARAMS_DIR} already exists; save to a new directory or "
                         f"delete the old one first")
    params = unwrap_variables(params)
    model_kind = infer_model_kind(params)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() == 0:
        values = {**config_to_dict(config), "model_kind": model_kind}
        (directory / CONFIG_FILE).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        if tokenizer_file is not None:
            copy_tokenizer_file(tokenizer_file, directory)


def _numpy_restore_args(metadata_tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                  metadata_tree)


def tree_metadata(directory: epath.Path) -> dict[str, Any]:
    """The saved tree's metadata (orbax returns it wrapped differently across versions)."""
    handler = ocp.PyTreeCheckpointHandler()  # the handler: no step-level metadata lookup
    try:
        metadata = handler.metadata(directory)
    finally:
        handler.close()
    metadata = getattr(metadata, "item_metadata", metadata)
    return getattr(metadata, "tree", metadata)


def _restore_numpy_tree(directory: epath.Path, subtree: Optional[str] = None) -> Any:
    """Restores a saved pytree (or only its top-level `subtree`) as host numpy arrays."""
    tree = tree_metadata(directory)
    checkpointer = ocp.PyTreeCheckpointer()
    if subtree is None:
        return checkpointer.restore(
            directory, args=ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(tree)))
    if subtree not in tree:
        raise ValueError(f"checkpoint item {directory} has no {subtree!r} entry; it holds "
                         f"{sorted(tree)}")
    wanted = {subtree: tree[subtree]}
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=_numpy_restore_args(wanted), partial_restore=True))
    return restored[subtree]


def _step_dirs(checkpoints_dir: epath.Path) -> list[tuple[int, epath.Path]]:
    """Finished step folders (orbax names them by the step; unfinished ones carry a suffix)."""
    steps = [(int(p.name), p) for p in checkpoints_dir.iterdir()
             if p.is_dir() and p.name.isdigit()]
    return sorted(steps)


def _load_training_step(step_dir: epath.Path) -> tuple[Params, MosaicBertConfig]:
    config_dir = step_dir / MODEL_CONFIG_ITEM
    if not config_dir.exists():
        raise ValueError(f"training checkpoint {step_dir} has no {MODEL_CONFIG_ITEM!r} item, "
                         f"so its model config is unknown")
    json_checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    config = config_from_dict(json_checkpointer.restore(config_dir))
    params = _restore_numpy_tree(step_dir / STATE_ITEM, subtree="params")
    return unwrap_variables(params), config


def _load_pretrained_folder(directory: epath.Path) -> tuple[Params, MosaicBertConfig]:
    config = config_from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    return unwrap_variables(_restore_numpy_tree(directory / PARAMS_DIR)), config


def _load_torch_folder(directory: epath.Path) -> tuple[Params, MosaicBertConfig]:
    state_dict, hf_config = read_torch_folder(directory)
    config = config_from_hf_json(hf_config)
    return torch_state_dict_to_flax(state_dict, config), config


def _expected_layouts() -> str:
    return (f"a folder from save_pretrained ({CONFIG_FILE} + {PARAMS_DIR}/), a training "
            f"workdir (holding {CHECKPOINTS_DIR}/), its {CHECKPOINTS_DIR}/ folder, one step "
            f"folder {CHECKPOINTS_DIR}/<step> (holding {STATE_ITEM}/ and "
            f"{MODEL_CONFIG_ITEM}/), or a PyTorch folder ({CONFIG_FILE} + one of "
            f"{list(TORCH_WEIGHT_FILES)})")


def checkpoint_kind(path: str | os.PathLike) -> tuple[str, epath.Path]:
    """Classifies `path` as ('pretrained'|'step'|'torch', folder to read); raises otherwise."""
    directory = _abs_path(path)
    if not directory.exists():
        raise ValueError(f"checkpoint path {os.fspath(path)!r} does not exist")
    if not directory.is_dir():
        raise ValueError(f"checkpoint path {os.fspath(path)!r} is a file; expected "
                         f"{_expected_layouts()}")
    if (directory / CONFIG_FILE).exists() and (directory / PARAMS_DIR).is_dir():
        return "pretrained", directory
    if (directory / STATE_ITEM).is_dir():
        return "step", directory
    if (directory / CONFIG_FILE).exists() and any(
            (directory / name).exists() for name in TORCH_WEIGHT_FILES):
        return "torch", directory
    checkpoints_dir = directory / CHECKPOINTS_DIR
    if not checkpoints_dir.is_dir():
        steps = _step_dirs(directory)
        if not steps:
            raise ValueError(f"{os.fspath(path)!r} holds no MosaicBERT checkpoint; expected "
                             f"{_expected_layouts()}")
        checkpoints_dir = directory
    steps = _step_dirs(checkpoints_dir)
    if not steps:
        raise ValueError(f"{checkpoints_dir} holds no finished checkpoint step (no numbered "
                         f"step folder); has training saved a checkpoint yet?")
    return "step", steps[-1][1]


def checkpoints_dir(workdir: str | os.PathLike) -> str:
    """The folder of a training workdir that holds its numbered step checkpoints."""
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS_DIR)


def checkpoint_root(path: str | os.PathLike) -> epath.Path:
    """The folder a checkpoint belongs to: itself, or the training workdir of a step folder."""
    kind, directory = checkpoint_kind(path)
    if kind == "step" and directory.parent.name == CHECKPOINTS_DIR:
        return directory.parent.parent
    return directory


def trained_seq_len(path: str | os.PathLike) -> Optional[int]:
    """The data.seq_len a training checkpoint was trained at (its train_config item); None for
    other layouts and for checkpoints older than that item."""
    kind, directory = checkpoint_kind(path)
    item = directory / TRAIN_CONFIG_ITEM
    if kind != "step" or not item.is_dir():
        return None
    values = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)
    seq_len = values.get("seq_len") if isinstance(values, dict) else None
    return int(seq_len) if seq_len else None


def load_pretrained(path: str) -> tuple[Params, MosaicBertConfig]:
    """Loads (params as numpy arrays, config) from any layout in the module docstring."""
    kind, directory = checkpoint_kind(path)
    logging.info("loading %s checkpoint from %s", kind, directory)
    loaders = {"pretrained": _load_pretrained_folder, "torch": _load_torch_folder,
               "step": _load_training_step}
    params, config = loaders[kind](directory)
    check_flax_params(params, config)
    return params, config


__all__ = ["TOKENIZER_FILES", "TRAIN_CHECKPOINT_ITEMS", "checkpoint_kind", "checkpoint_root",
           "checkpoints_dir", "config_from_dict", "config_to_dict", "copy_tokenizer_file",
           "find_tokenizer_files", "load_pretrained", "save_pretrained", "trained_seq_len"]
