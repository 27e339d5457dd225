"""Synthetic data, no corpus needed: random-token corpora written as shards (C4-like document
lengths), and `SyntheticMLMBatches`, in-memory MLM batches packed and masked by the real
pipeline's code, for benchmarks, tests and `data.source=synthetic`."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from mosaicbert_jax.data.masking import MaskingTables, mask_rows, max_predictions_for
from mosaicbert_jax.data.packing import assemble_rows
from mosaicbert_jax.data.shards import write_token_shards
from mosaicbert_jax.data.tokenizer import SpecialTokens

# Ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK], as in a vocabulary from train_wordpiece.
SYNTHETIC_SPECIAL = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)


def long_tailed_lengths(num_documents: int, rng: np.random.Generator, median: float = 230.0,
                        sigma: float = 1.2, max_length: int = 50_000) -> np.ndarray:
    """Log-normal document lengths in tokens, like C4's: many short documents, a few very long
    (median 230, 10% under ~50, 1% over ~3,700 with the defaults)."""
    lengths = rng.lognormal(np.log(median), sigma, num_documents)
    return np.clip(np.round(lengths), 1, max_length).astype(np.int64)


def synthetic_documents(num_tokens: int, vocab_size: int = 8192, seed: int = 0,
                        **length_options) -> list[np.ndarray]:
    """Documents of random non-special ids whose lengths follow `long_tailed_lengths`, about
    `num_tokens` tokens in all. Random ids make every document unique."""
    rng = np.random.default_rng(seed)
    blocks = [long_tailed_lengths(1024, rng, **length_options)]
    while sum(int(b.sum()) for b in blocks) < num_tokens:
        blocks.append(long_tailed_lengths(1024, rng, **length_options))
    lengths = np.concatenate(blocks)
    lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1]
    tokens = rng.integers(len(SYNTHETIC_SPECIAL.ids), vocab_size, int(lengths.sum()), np.int64)
    return np.split(tokens.astype(np.uint16 if vocab_size <= 1 << 16 else np.uint32),
                    np.cumsum(lengths)[:-1])


def write_synthetic_shards(shards_dir: str, num_tokens: int, vocab_size: int = 8192,
                           seed: int = 0, eval_tokens: int = 0, shard_documents: int = 100_000,
                           **length_options) -> dict:
    """A complete shards dir of synthetic documents (a 'train' split, and 'eval' if asked)."""
    splits = {"train": synthetic_documents(num_tokens, vocab_size, seed, **length_options)}
    if eval_tokens:
        splits["eval"] = synthetic_documents(eval_tokens, vocab_size, seed + 1, **length_options)
    return write_token_shards(shards_dir, splits, vocab_size, SYNTHETIC_SPECIAL,
                              shard_documents=shard_documents, extra={"synthetic": True})


_STREAM, _MASKING = 1, 2  # seeded generator streams of SyntheticMLMBatches


class SyntheticMLMBatches:
    """MLMBatches' batch format from random tokens: a stream of [CLS] doc [SEP] documents cut
    into rows by the real packing (`assemble_rows`) and masked by the real masking
    (`mask_rows`: K = ceil(mask_prob * (seq_len - 2)) slots, 80/10/10 replacement), with the
    ids of SYNTHETIC_SPECIAL. Document lengths are exponential with mean `mean_doc_len`
    tokens; None: one document longer than any row, so every row is one full segment.

    Global batch n (batch_size * process_count rows) is a pure function of (seed, n); process p
    yields its rows p * batch_size onwards, so global batches do not depend on the process count
    (each process makes the whole global batch: cheap for the small runs synthetic data is for).
    `get_state()` (the same on every process) / `set_state()` resume exactly, on any count.
    """

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, mask_prob: float = 0.3,
                 seed: int = 0, mean_doc_len: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count="
                             f"{process_count})")
        if batch_size < 1 or seq_len < 8:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and seq_len={seq_len} >= 8")
        if vocab_size <= len(SYNTHETIC_SPECIAL.ids):
            raise ValueError(f"vocab_size={vocab_size} must exceed the "
                             f"{len(SYNTHETIC_SPECIAL.ids)} special tokens")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob={mask_prob} must be in (0, 1]")
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.mask_prob, self.seed, self.mean_doc_len = mask_prob, seed, mean_doc_len
        self.max_predictions = max_predictions_for(seq_len, mask_prob)
        self.special = SYNTHETIC_SPECIAL
        self._tables = MaskingTables(vocab_size, vocab_size, SYNTHETIC_SPECIAL)
        self.process_index, self.global_batch_size = process_index, batch_size * process_count
        self._index = 0

    def get_state(self) -> dict:
        return {"index": self._index, "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict) -> None:
        saved = state.get("global_batch_size", self.global_batch_size)
        if saved != self.global_batch_size:
            raise ValueError(f"saved data state has global_batch_size={saved} but this iterator "
                             f"has global_batch_size={self.global_batch_size}; resume with the "
                             f"same data settings")
        self._index = int(state["index"])

    def __iter__(self) -> "SyntheticMLMBatches":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = self.batch_at(self._index)
        self._index += 1
        return batch

    def _stream(self, rng: np.random.Generator) -> np.ndarray:
        """global_batch_size * (seq_len - 2) stream tokens: random documents, [CLS] doc [SEP]."""
        count = self.global_batch_size * (self.seq_len - 2)
        content = self._tables.replacement_ids
        stream = content[rng.integers(0, len(content), count)]
        if self.mean_doc_len:
            # Every document takes >= 3 stream tokens, so this many always cover the stream.
            lengths = np.maximum(1, np.round(rng.exponential(self.mean_doc_len, count // 3 + 1)))
            ends = np.cumsum(lengths.astype(np.int64) + 2)  # a document's [SEP] is at end - 1
            starts = ends - lengths.astype(np.int64) - 2
            stream[starts[starts < count]] = self.special.cls
            stream[ends[ends <= count] - 1] = self.special.sep
        return stream

    def batch_at(self, index: int) -> Dict[str, np.ndarray]:
        """This process's rows of global batch `index` (what the iterator yields at that step)."""
        stream = self._stream(np.random.default_rng([self.seed, _STREAM, index]))
        input_ids, segment_ids = assemble_rows(stream, self.global_batch_size, self.seq_len,
                                               self.special)
        rng = np.random.default_rng([self.seed, _MASKING, index])
        batch = mask_rows(input_ids, rng, self.mask_prob, self.max_predictions, self._tables)
        batch["segment_ids"] = segment_ids
        rows = slice(self.process_index * self.batch_size,
                     (self.process_index + 1) * self.batch_size)
        return {key: value[rows] for key, value in batch.items()}
