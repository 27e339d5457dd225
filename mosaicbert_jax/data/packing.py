"""Packing: the document stream of one process, cut into full rows of [CLS] ... [SEP] segments.

The stream of an epoch is every document of this process's slice, in a seeded shuffled order,
each written as [CLS] tokens [SEP]. Epochs follow each other without a gap. A row takes the next
`seq_len - 2` stream tokens; a document cut by the row's end is closed with an extra [SEP] and
continues in the next row after an extra [CLS], so every segment of a row is [CLS] ... [SEP],
no token is dropped, and rows are full except for a token or two where a cut lands right at a
document boundary. All of it is vectorised numpy: no Python loop per token or per document.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from mosaicbert_jax.data.shards import Shard
from mosaicbert_jax.data.tokenizer import SpecialTokens

# Stream names for the seeded generators, so that different uses never share random numbers.
_SHARD_ORDER, _DOCUMENT_ORDER = 1, 2


def process_slice(num_documents: int, process_index: int, process_count: int) -> Tuple[int, int]:
    """The contiguous range of a shard's documents that process `process_index` reads."""
    return (num_documents * process_index // process_count,
            num_documents * (process_index + 1) // process_count)


def stream_length(shard: Shard, start: int, end: int) -> int:
    """Stream tokens of documents [start, end) of a shard: their tokens plus [CLS] and [SEP]."""
    return int(shard.offsets[end] - shard.offsets[start]) + 2 * (end - start)


class _EpochShard:
    """One shard's documents in an epoch's shuffled order, with stream offsets of each."""

    def __init__(self, shard: Shard, start: int, end: int, rng: np.random.Generator):
        order = start + rng.permutation(end - start)
        self.token_starts = shard.offsets[order]
        lengths = shard.offsets[order + 1] - self.token_starts
        self.stream_starts = np.zeros(len(order) + 1, np.int64)
        np.cumsum(lengths + 2, out=self.stream_starts[1:])
        self.tokens = shard.tokens

    def read(self, start: int, end: int, out: np.ndarray, special: SpecialTokens) -> None:
        """Writes stream tokens [start, end) of this shard into `out` (length end - start)."""
        bounds = self.stream_starts
        first = int(np.searchsorted(bounds, start, side="right")) - 1
        last = int(np.searchsorted(bounds, end, side="left"))  # documents first..last-1 overlap
        doc_begin = bounds[first:last]
        doc_end = bounds[first + 1:last + 1]
        counts = np.minimum(doc_end, end) - np.maximum(doc_begin, start)
        # Stream position p of document d holds token token_starts[d] + (p - doc_begin[d] - 1).
        shift = self.token_starts[first:last] - doc_begin - 1
        index = np.arange(start, end, dtype=np.int64)
        index += np.repeat(shift, counts)
        cls_at = doc_begin[doc_begin >= start] - start
        sep_at = doc_end[doc_end <= end] - 1 - start
        index[cls_at] = 0
        index[sep_at] = 0
        out[:] = self.tokens[index]
        out[cls_at] = special.cls
        out[sep_at] = special.sep


class DocumentStream:
    """The endless (or one-epoch) stream of [CLS] doc [SEP] tokens of one process's slice."""

    def __init__(self, shards: List[Shard], special: SpecialTokens, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.shards = shards
        self.special = special
        self.seed = seed
        self.process_index = process_index
        self.slices = [process_slice(s.num_documents, process_index, process_count) for s in shards]
        self.shard_lengths = np.array(
            [stream_length(s, lo, hi) for s, (lo, hi) in zip(shards, self.slices)], np.int64)
        self.epoch_length = int(self.shard_lengths.sum())
        self.num_documents = sum(hi - lo for lo, hi in self.slices)
        self.num_tokens = self.epoch_length - 2 * self.num_documents
        self._epoch_layout: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._epoch_shards: Dict[Tuple[int, int], _EpochShard] = {}

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.process_index, *keys])

    def _layout(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """Shard order of an epoch and the stream offset at which each of those shards starts."""
        if epoch not in self._epoch_layout:
            order = self._rng(_SHARD_ORDER, epoch).permutation(len(self.shards))
            starts = np.zeros(len(order) + 1, np.int64)
            np.cumsum(self.shard_lengths[order], out=starts[1:])
            self._epoch_layout = {epoch: (order, starts)}
        return self._epoch_layout[epoch]

    def _epoch_shard(self, epoch: int, shard_index: int) -> _EpochShard:
        key = (epoch, shard_index)
        if key not in self._epoch_shards:
            lo, hi = self.slices[shard_index]
            if len(self._epoch_shards) >= 2:  # a read spans at most a few shards; keep the latest
                self._epoch_shards.pop(next(iter(self._epoch_shards)))
            self._epoch_shards[key] = _EpochShard(
                self.shards[shard_index], lo, hi, self._rng(_DOCUMENT_ORDER, epoch, shard_index))
        return self._epoch_shards[key]

    def read(self, position: int, count: int, repeat: bool, dtype=np.int32) -> np.ndarray:
        """Stream tokens [position, position + count); [PAD] past the end when not repeating."""
        out = np.full(count, self.special.pad, dtype)
        if self.epoch_length == 0:
            return out
        done = 0
        while done < count:
            epoch, offset = divmod(position + done, self.epoch_length)
            if epoch > 0 and not repeat:
                break
            order, starts = self._layout(epoch)
            slot = int(np.searchsorted(starts, offset, side="right")) - 1
            local = offset - int(starts[slot])
            take = min(count - done, int(starts[slot + 1]) - offset)
            self._epoch_shard(epoch, int(order[slot])).read(
                local, local + take, out[done:done + take], self.special)
            done += take
        return out


def assemble_rows(stream: np.ndarray, batch_size: int, seq_len: int,
                  special: SpecialTokens) -> Tuple[np.ndarray, np.ndarray]:
    """Turns batch_size * (seq_len - 2) stream tokens into rows and their segment ids.

    A row starting inside a document gets a leading [CLS]; one ending inside a document gets a
    trailing [SEP]. A stray [SEP] at a row's start (its document was closed in the previous row)
    and a stray [CLS] at a row's end (its document starts in the next row) become padding.
    """
    width = seq_len - 2
    tokens = stream.reshape(batch_size, width)
    first, last = tokens[:, 0], tokens[:, -1]

    def is_boundary(t: np.ndarray) -> np.ndarray:
        return (t == special.cls) | (t == special.sep) | (t == special.pad)

    wide = np.empty((batch_size, seq_len + 2), np.int32)
    wide[:, 0] = special.cls
    wide[:, 1:width + 1] = tokens
    wide[:, width + 1] = np.where(is_boundary(last), special.pad, special.sep)
    wide[:, width + 2:] = special.pad
    wide[last == special.cls, width] = special.pad
    # Where each output row starts in `wide`: 0 keeps the extra [CLS], 2 skips a stray [SEP].
    start = np.where(is_boundary(first), np.where(first == special.sep, 2, 1), 0)
    columns = start[:, None] + np.arange(seq_len)[None, :]
    input_ids = np.take_along_axis(wide, columns, axis=1)
    segment_ids = np.cumsum(input_ids == special.cls, axis=1, dtype=np.int32)
    segment_ids[input_ids == special.pad] = 0
    return input_ids, segment_ids
