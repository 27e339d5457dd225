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
Opening a split checks every file against the metadata (npy header, dtype, length, byte size)
and the token ids against the vocabulary, so a damaged shard is an error naming its file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from mosaicbert_jax.cli_errors import UserError
from mosaicbert_jax.data.tokenizer import SpecialTokens, padded_vocab_size

FORMAT = "mosaicbert-jax-shards"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
PREPARE_FILE = "prepare.json"
PARTIAL_SUFFIX = ".partial"
# Splits up to this many tokens have their ids scanned when opened (a max over the memory map:
# ~0.1 s per GB from the page cache); larger ones rely on each shard's max_id from prepare.
FULL_SCAN_TOKENS = 1 << 30


def partial_dir(shards_dir: str) -> str:
    """Where `prepare` builds `shards_dir` until it is complete: a hidden sibling directory."""
    parent, name = os.path.split(os.path.abspath(shards_dir))
    return os.path.join(parent, f".{name}{PARTIAL_SUFFIX}")


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
    marker = {"index": index, "num_documents": int(len(lengths)), "num_tokens": int(len(tokens)),
              "max_id": int(tokens.max()) if len(tokens) else -1}
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
                   "shards": [{k: s[k] for k in ("index", "num_documents", "num_tokens",
                                                 "max_id") if k in s} for s in shards]}
            for name, shards in splits.items()},
    }
    meta.update(extra or {})
    _write_json_atomic(os.path.join(shards_dir, META_FILE), meta)
    return meta


def _rerun_hint(shards_dir: str) -> str:
    return (f"delete {shards_dir} and run its prepare command again (the settings are in "
            f"{os.path.join(shards_dir, PREPARE_FILE)}): python -m mosaicbert_jax.data.prepare "
            f"--out {shards_dir} ...")


def read_metadata(shards_dir: str) -> dict:
    """meta.json of a complete shards dir; a clear error for a missing, unfinished or foreign one."""
    partial = partial_dir(shards_dir)
    unfinished = os.path.isdir(partial) or os.path.exists(os.path.join(shards_dir, PREPARE_FILE))
    if os.path.isfile(shards_dir):
        raise UserError(f"{shards_dir} is a file, not a prepared shards dir; pass the --out "
                        f"directory of `python -m mosaicbert_jax.data.prepare`")
    if not os.path.isdir(shards_dir) and not unfinished:
        raise UserError(f"shards directory {shards_dir} does not exist; run "
                        f"`python -m mosaicbert_jax.data.prepare --out {shards_dir} ...` first")
    path = os.path.join(shards_dir, META_FILE)
    if not os.path.exists(path):
        if unfinished:
            raise UserError(f"the preparation of {shards_dir} did not finish (its partial build "
                            f"is {partial if os.path.isdir(partial) else shards_dir}); rerun the "
                            f"same prepare command to resume it")
        raise UserError(f"{shards_dir} is not a prepared shards dir (it has no {META_FILE}); "
                        f"make one with `python -m mosaicbert_jax.data.prepare --out DIR ...` "
                        f"and pass that DIR")
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is damaged ({error}); {_rerun_hint(shards_dir)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path} is not a {FORMAT} v{VERSION} metadata file, so {shards_dir} is "
                        f"not a prepared shards dir of this version; prepare it again with "
                        f"`python -m mosaicbert_jax.data.prepare --out NEW_DIR ...`")
    return meta


def check_vocab_fits(data_vocab_size: int, model_vocab_size: int) -> None:
    """Raises when token ids of the data could exceed the model's embedding table."""
    if data_vocab_size > model_vocab_size:
        raise UserError(
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


def _npy_layout(path: str, shards_dir: str) -> tuple:
    """(shape, dtype, data offset) from a .npy header; an error naming the file if unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"shard file {path} is missing; {_rerun_hint(shards_dir)}")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"npy format version {version}")
            return shape, dtype, handle.tell()
    except (OSError, ValueError) as error:
        raise UserError(f"shard file {path} is damaged: not a readable .npy file ({error}); "
                        f"{_rerun_hint(shards_dir)}") from None


def _checked_npy(path: str, shards_dir: str, shape: tuple, dtype: np.dtype) -> int:
    """Checks a .npy file holds an array of `shape` and `dtype`, all of its bytes present;
    returns the data offset."""
    found_shape, found_dtype, offset = _npy_layout(path, shards_dir)
    if tuple(found_shape) != shape or found_dtype != dtype:
        raise UserError(f"shard file {path} holds a {found_dtype} array of shape {found_shape}, "
                        f"but the metadata says {dtype} {shape}; {_rerun_hint(shards_dir)}")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise UserError(f"shard file {path} is damaged ({state}: {size:,} bytes, expected "
                        f"{expected:,}); {_rerun_hint(shards_dir)}")
    return offset


def _open_shard(shards_dir: str, split: str, info: dict, meta: dict, scan_ids: bool) -> Shard:
    """Opens one shard after checking its files against `info` (its entry in meta.json)."""
    stem = _stem(shards_dir, split, info["index"])
    tokens_path, offsets_path = stem + ".tokens.npy", stem + ".offsets.npy"
    vocab_size = int(meta["vocab_size"])
    dtype = np.dtype(meta.get("token_dtype") or token_dtype(vocab_size))
    num_tokens, num_documents = int(info["num_tokens"]), int(info["num_documents"])
    _checked_npy(tokens_path, shards_dir, (num_tokens,), dtype)
    _checked_npy(offsets_path, shards_dir, (num_documents + 1,), np.dtype(np.int64))
    # An empty array cannot be memory-mapped; it costs nothing to load.
    tokens = np.load(tokens_path, mmap_mode="r" if num_tokens else None)
    offsets = np.load(offsets_path)
    if offsets[0] != 0 or offsets[-1] != num_tokens or (np.diff(offsets) <= 0).any():
        raise UserError(f"shard file {offsets_path} is damaged (its document offsets do not run "
                        f"from 0 to {num_tokens} in increasing order); {_rerun_hint(shards_dir)}")
    max_id = int(tokens.max()) if scan_ids and num_tokens else int(info.get("max_id", -1))
    if max_id >= vocab_size:
        raise UserError(f"shard file {tokens_path} holds token id {max_id}, beyond the "
                        f"vocabulary of {vocab_size} ids in {os.path.join(shards_dir, META_FILE)}"
                        f"; {_rerun_hint(shards_dir)}")
    return Shard(tokens=np.asarray(tokens), offsets=offsets)


def open_split(shards_dir: str, split: str, meta: Optional[dict] = None) -> List[Shard]:
    """Opens every shard of `split` (tokens memory-mapped, so nothing large is read up front).

    Each shard's files are checked against the metadata; the ids are scanned against the
    vocabulary when the split has at most FULL_SCAN_TOKENS tokens (else prepare's max_id is used).
    """
    meta = meta or read_metadata(shards_dir)
    if split not in meta["splits"]:
        raise UserError(f"split {split!r} is not in {shards_dir}; it has {sorted(meta['splits'])}")
    scan_ids = meta["splits"][split]["num_tokens"] <= FULL_SCAN_TOKENS
    return [_open_shard(shards_dir, split, info, meta, scan_ids)
            for info in meta["splits"][split]["shards"]]


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
