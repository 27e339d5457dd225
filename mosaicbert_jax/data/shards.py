"""Prepared-shard layout: memory-mapped token files with document offsets, plus metadata.

    SHARDS_DIR/meta.json                  written last; lists splits, shards, counts, special ids
    SHARDS_DIR/tokenizer.json             the tokenizer that produced the ids (when there is one)
    SHARDS_DIR/<split>/<index>.tokens.npy  uint16 (uint32 for vocabularies over 65536): the
                                          tokens of all documents, back to back, no specials
    SHARDS_DIR/<split>/<index>.offsets.npy int64 [documents + 1]: document d is
                                          tokens[offsets[d]:offsets[d + 1]]
    SHARDS_DIR/<split>/<index>.json        completion marker with the shard's counts

A shard's marker is written after its arrays (each via a temporary file and a rename), so a
shard with a marker is complete and an interrupted `prepare` redoes only unmarked shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from mosaicbert_jax.data.tokenizer import SpecialTokens, padded_vocab_size

FORMAT = "mosaicbert-jax-shards"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _stem(shards_dir: str, split: str, index: int) -> str:
    return os.path.join(shards_dir, split, f"{index:05d}")


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    temporary = path + ".tmp.npy"
    np.save(temporary, array)
    os.replace(temporary, path)


def _write_json_atomic(path: str, value: dict) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


def write_shard(shards_dir: str, split: str, index: int, tokens: np.ndarray,
                lengths: np.ndarray) -> dict:
    """Writes one shard's tokens and offsets, then its completion marker; returns the marker."""
    lengths = np.asarray(lengths, np.int64)
    if (lengths <= 0).any():
        raise ValueError("documents must have at least one token; drop empty documents first")
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != len(tokens):
        raise ValueError(f"document lengths sum to {offsets[-1]}, but there are {len(tokens)} "
                         f"tokens")
    stem = _stem(shards_dir, split, index)
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    _save_npy_atomic(stem + ".tokens.npy", tokens)
    _save_npy_atomic(stem + ".offsets.npy", offsets)
    marker = {"index": index, "num_documents": int(len(lengths)), "num_tokens": int(len(tokens))}
    _write_json_atomic(stem + ".json", marker)
    return marker


def completed_shard(shards_dir: str, split: str, index: int) -> Optional[dict]:
    """The marker of a fully written shard, or None when the shard is missing or partial."""
    path = _stem(shards_dir, split, index) + ".json"
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_metadata(shards_dir: str, vocab_size: int, special: SpecialTokens,
                   splits: Dict[str, List[dict]], tokenizer_file: Optional[str] = None,
                   extra: Optional[dict] = None) -> dict:
    """Writes meta.json (the mark of a complete shards dir) from the shards' markers."""
    meta = {
        "format": FORMAT, "version": VERSION, "complete": True,
        "tokenizer_file": tokenizer_file,
        "vocab_size": int(vocab_size), "padded_vocab_size": padded_vocab_size(vocab_size),
        "special_ids": special.as_dict(), "token_dtype": token_dtype(vocab_size).name,
        "splits": {
            name: {"num_documents": sum(s["num_documents"] for s in shards),
                   "num_tokens": sum(s["num_tokens"] for s in shards),
                   "shards": [{"index": s["index"], "num_documents": s["num_documents"],
                               "num_tokens": s["num_tokens"]} for s in shards]}
            for name, shards in splits.items()},
    }
    meta.update(extra or {})
    _write_json_atomic(os.path.join(shards_dir, META_FILE), meta)
    return meta


def read_metadata(shards_dir: str) -> dict:
    """meta.json of a complete shards dir; a clear error for a missing or unfinished one."""
    if not os.path.isdir(shards_dir):
        raise ValueError(f"shards directory {shards_dir} does not exist; run "
                         f"`python -m mosaicbert_jax.data.prepare --out {shards_dir} ...` first")
    path = os.path.join(shards_dir, META_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{shards_dir} has no {META_FILE}: its preparation did not finish; "
                         f"rerun the same prepare command to resume it")
    with open(path) as handle:
        meta = json.load(handle)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} metadata file")
    return meta


def check_vocab_fits(data_vocab_size: int, model_vocab_size: int) -> None:
    """Raises when token ids of the data could exceed the model's embedding table."""
    if data_vocab_size > model_vocab_size:
        raise ValueError(
            f"the tokenizer's vocabulary ({data_vocab_size} ids, padded "
            f"{padded_vocab_size(data_vocab_size)}) is too large for the model's vocab_size="
            f"{model_vocab_size}; set the model's vocab_size to "
            f"{padded_vocab_size(data_vocab_size)} (e.g. MosaicBertConfig(vocab_size=...)) or "
            f"prepare the data with a smaller vocabulary")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard opened for reading: memory-mapped tokens and in-memory document offsets."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


def open_split(shards_dir: str, split: str, meta: Optional[dict] = None) -> List[Shard]:
    """Opens every shard of `split` (tokens memory-mapped, so nothing large is read up front)."""
    meta = meta or read_metadata(shards_dir)
    if split not in meta["splits"]:
        raise ValueError(f"split {split!r} is not in {shards_dir}; it has {sorted(meta['splits'])}")
    shards = []
    for info in meta["splits"][split]["shards"]:
        stem = _stem(shards_dir, split, info["index"])
        # An empty array cannot be memory-mapped; it costs nothing to load.
        tokens = np.load(stem + ".tokens.npy", mmap_mode="r" if info["num_tokens"] else None)
        offsets = np.load(stem + ".offsets.npy")
        if offsets[-1] != len(tokens) or len(offsets) != info["num_documents"] + 1:
            raise ValueError(f"shard {stem} does not match its metadata; prepare it again")
        shards.append(Shard(tokens=np.asarray(tokens), offsets=offsets))
    return shards


def read_documents(shards_dir: str, split: str) -> Iterator[np.ndarray]:
    """Every document of `split` as an array of token ids, in prepared order (for inspection)."""
    for shard in open_split(shards_dir, split):
        for start, end in zip(shard.offsets[:-1], shard.offsets[1:]):
            yield shard.tokens[start:end]


def write_token_shards(shards_dir: str, splits: Dict[str, Sequence[np.ndarray]], vocab_size: int,
                       special: SpecialTokens, shard_documents: int = 100_000,
                       extra: Optional[dict] = None) -> dict:
    """Writes already-tokenized documents (no specials) as a complete shards dir.

    For synthetic corpora (tests, benchmarks) and for callers with their own tokenization.
    """
    dtype = token_dtype(vocab_size)
    shard_markers: Dict[str, List[dict]] = {}
    for split, documents in splits.items():
        shard_markers[split] = []
        for index, start in enumerate(range(0, max(len(documents), 1), shard_documents)):
            group = [np.asarray(d) for d in documents[start:start + shard_documents]]
            lengths = np.array([len(d) for d in group], np.int64)
            tokens = np.concatenate(group).astype(dtype) if group else np.zeros(0, dtype)
            shard_markers[split].append(write_shard(shards_dir, split, index, tokens, lengths))
    return write_metadata(shards_dir, vocab_size, special, shard_markers, extra=extra)
