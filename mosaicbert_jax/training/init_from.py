"""Continued pretraining: `--config.init_from=DIR` starts a run from pretrained weights.

DIR is anything `checkpoint.load_pretrained` reads (a converted folder, a save_pretrained folder,
a training workdir or one of its steps, a PyTorch folder), or a released hub name such as
mosaicml/mosaic-bert-base (read through the Hugging Face cache, see `mosaicbert_jax.hub`). Only the parameters are taken; the
optimizer state and the schedule start fresh at step 0. When the data's tokenizer differs from
the checkpoint's (compared token by token, by string), the embedding and MLM-bias rows of the
tokens both vocabularies share are copied and every other row keeps its fresh init. Once the
workdir holds a checkpoint the run resumes from it and init_from is ignored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mosaicbert_jax import checkpoint, hub
from mosaicbert_jax.config import MosaicBertConfig

# Parameters indexed by token id along their first axis (path suffixes in the params tree).
VOCAB_LEAVES = (("word_embeddings", "embedding"), ("cls", "decoder_bias"))


@dataclasses.dataclass(frozen=True)
class VocabMatch:
    """Which rows of the new vocab-indexed parameters come from which checkpoint rows."""

    target_ids: np.ndarray
    source_ids: np.ndarray
    summary: str


def read_vocab(path: Optional[str]) -> Optional[dict[str, int]]:
    """token -> id of a tokenizer.json or vocab.txt (or a folder holding one); None if absent."""
    if not path:
        return None
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                return read_vocab(os.path.join(path, name))
        return None
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return {line.rstrip("\n"): i for i, line in enumerate(f)}
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path).get_vocab(with_added_tokens=True)


def match_vocabularies(source: Optional[dict[str, int]], target: Optional[dict[str, int]],
                       source_rows: int, target_rows: int) -> VocabMatch:
    """The rows to copy: every row when the vocabularies are equal, else the shared tokens."""
    if source is None or target is None:
        missing = "the checkpoint's" if source is None else "the data's"
        if source_rows != target_rows:
            raise ValueError(f"init_from: the checkpoint's vocab has {source_rows} rows and the "
                             f"data's {target_rows}, and {missing} tokenizer is unknown, so rows "
                             f"cannot be matched by token; put the checkpoint's tokenizer.json "
                             f"next to it (or train on data with its tokenizer)")
        ids = np.arange(target_rows)
        return VocabMatch(ids, ids, f"{missing} tokenizer is unknown; vocabularies of equal "
                                    f"size ({target_rows}) taken as the same, all rows kept")
    if source == target and source_rows == target_rows:
        ids = np.arange(target_rows)
        return VocabMatch(ids, ids, f"same vocabulary ({len(target)} tokens), all "
                                    f"{target_rows} rows kept")
    pairs = sorted((target[token], source[token]) for token in target.keys() & source.keys()
                   if target[token] < target_rows and source[token] < source_rows)
    target_ids = np.array([t for t, _ in pairs], np.int64)
    source_ids = np.array([s for _, s in pairs], np.int64)
    fresh = target_rows - len(pairs)
    return VocabMatch(target_ids, source_ids,
                      f"vocabulary resized: kept {len(pairs)} of the data's {len(target)} tokens "
                      f"(shared by string with the checkpoint's {len(source)}), {fresh} of "
                      f"{target_rows} rows initialised fresh")


def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _is_vocab_leaf(names: tuple[str, ...]) -> bool:
    return any(names[-len(suffix):] == suffix for suffix in VOCAB_LEAVES)


def _global_array(value: np.ndarray, like: jax.Array) -> jax.Array:
    """`value` (the same on every process) as a global array sharded like `like`."""
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def _replicated(value: np.ndarray, like: jax.Array) -> jax.Array:
    sharding = NamedSharding(like.sharding.mesh, PartitionSpec()) \
        if isinstance(like.sharding, NamedSharding) else like.sharding
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _copy_rows(fresh: jax.Array, source: np.ndarray, match: VocabMatch) -> jax.Array:
    """`fresh` with rows `match.target_ids` replaced by `source[match.source_ids]`."""
    if len(match.target_ids) == fresh.shape[0] and source.shape == fresh.shape and np.array_equal(
            match.target_ids, match.source_ids):
        return _global_array(source.astype(fresh.dtype), fresh)
    if not len(match.target_ids):
        return fresh
    rows = _replicated(source[match.source_ids].astype(fresh.dtype), fresh)
    ids = _replicated(match.target_ids.astype(np.int32), fresh)
    return jax.jit(lambda f, i, r: f.at[i].set(r), out_shardings=fresh.sharding)(fresh, ids, rows)


def load_initial_params(path: str, params: Any, model_config: MosaicBertConfig,
                        data_tokenizer: Optional[str]) -> tuple[Any, str]:
    """`params` (freshly initialised, on the mesh) overwritten from the checkpoint at `path`;
    returns them and a one-line account of what was kept."""
    source_params, source_config = checkpoint.load_pretrained(path)
    source_vocab = read_vocab(os.fspath(checkpoint.checkpoint_root(path)))
    match = match_vocabularies(source_vocab, read_vocab(data_tokenizer),
                               source_config.vocab_size, model_config.vocab_size)
    source_leaves = {_path_names(p): v for p, v in
                     jax.tree_util.tree_flatten_with_path(source_params)[0]}

    def load(path_keys: tuple, fresh: jax.Array) -> jax.Array:
        names = _path_names(path_keys)
        shown = "/".join(names)
        if names not in source_leaves:
            raise ValueError(f"init_from {path}: the checkpoint has no parameter {shown} (is it "
                             f"a classification model? init_from needs an MLM checkpoint)")
        value = np.asarray(source_leaves[names])
        if _is_vocab_leaf(names):
            if value.shape[1:] != fresh.shape[1:]:
                raise ValueError(f"init_from {path}: {shown} is {value.shape} in the checkpoint "
                                 f"but {fresh.shape} here; set --config.model.preset to the "
                                 f"checkpoint's size")
            return _copy_rows(fresh, value, match)
        if value.shape != fresh.shape:
            raise ValueError(f"init_from {path}: {shown} is {value.shape} in the checkpoint but "
                             f"{fresh.shape} in this model; set --config.model.preset to the "
                             f"checkpoint's size (hidden {source_config.hidden_size}, "
                             f"{source_config.num_hidden_layers} layers)")
        return _global_array(value.astype(fresh.dtype), fresh)

    return jax.tree_util.tree_map_with_path(load, params), match.summary


def apply_init_from(path: str, state: dict, resume_step: int, model_config: MosaicBertConfig,
                    data_tokenizer: Optional[str], report: Callable[[str], None]) -> dict:
    """The train state to start from: `state` with the checkpoint's parameters (fresh optimizer,
    step 0), or `state` untouched when resuming (the workdir's checkpoint wins)."""
    if not path:
        return state
    if resume_step:
        report(f"init_from={path} ignored: resuming from step {resume_step} of this workdir")
        return state
    source = hub.resolve_model_source(os.path.expanduser(path))  # a hub name: its cached files
    params, summary = load_initial_params(source, state["params"], model_config, data_tokenizer)
    report(f"init_from {path}: parameters loaded, optimizer and schedule fresh; {summary}")
    return {**state, "params": params}


__all__ = ["VocabMatch", "apply_init_from", "load_initial_params", "match_vocabularies",
           "read_vocab"]
