"""Dynamic padding by length buckets: each batch is padded to the smallest bucket length
that fits it, so short examples do not cost max_seq_len tokens and jit compiles once per
bucket. Partial batches are filled with weight-0 rows (never dropped), keeping shapes static.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from mosaicbert_jax.glue.data import EncodedSplit


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples form one batch, and the padded length of its rows."""

    indices: np.ndarray
    seq_len: int


def make_buckets(max_seq_len: int, bucket_lengths: Sequence[int]) -> tuple[int, ...]:
    """The bucket lengths below max_seq_len, sorted, with max_seq_len as the last bucket."""
    bad = [b for b in bucket_lengths if int(b) <= 0]
    if bad:
        raise ValueError(f"bucket lengths must be positive; got {bad}")
    return tuple(sorted({int(b) for b in bucket_lengths if int(b) < max_seq_len})) + (
        int(max_seq_len),)


def bucket_index(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Index of the smallest bucket holding each length."""
    lengths = np.asarray(lengths)
    if lengths.size and lengths.max() > buckets[-1]:
        raise ValueError(f"an example of {lengths.max()} tokens exceeds the largest bucket "
                         f"{buckets[-1]}; tokenize with truncation to max_seq_len")
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def train_plan(lengths: np.ndarray, buckets: Sequence[int], batch_size: int,
               rng: np.random.Generator, group_by_length: bool = True) -> list[BatchPlan]:
    """One epoch of shuffled batches covering every example exactly once.

    group_by_length: batches hold examples of one bucket (least padding), in random order.
    Otherwise batches are uniformly random and padded to the bucket of their longest row.
    """
    which = bucket_index(lengths, buckets)
    if not group_by_length:
        return [BatchPlan(chunk, buckets[int(which[chunk].max())])
                for chunk in _chunks(rng.permutation(len(lengths)), batch_size)]
    plans = []
    for b, seq_len in enumerate(buckets):
        members = rng.permutation(np.flatnonzero(which == b))
        plans += [BatchPlan(chunk, seq_len) for chunk in _chunks(members, batch_size)]
    return [plans[i] for i in rng.permutation(len(plans))]


def steps_per_epoch(lengths: np.ndarray, buckets: Sequence[int], batch_size: int,
                    group_by_length: bool = True) -> int:
    """The number of batches train_plan makes (the same every epoch)."""
    if not group_by_length:
        return math.ceil(len(lengths) / batch_size)
    counts = np.bincount(bucket_index(lengths, buckets), minlength=len(buckets))
    return int(sum(math.ceil(c / batch_size) for c in counts))


def eval_plan(lengths: np.ndarray, buckets: Sequence[int], batch_size: int) -> list[BatchPlan]:
    """Deterministic batches grouped by bucket; predictions go back by example index."""
    which = bucket_index(lengths, buckets)
    return [BatchPlan(chunk, seq_len) for b, seq_len in enumerate(buckets)
            for chunk in _chunks(np.flatnonzero(which == b), batch_size)]


def collate(split: EncodedSplit, plan: BatchPlan, batch_size: int) -> dict[str, np.ndarray]:
    """Padded [batch_size, seq_len] arrays; rows past the plan's examples get weight 0.

    segment_ids is 1 on real tokens and 0 on padding (one example per row).
    """
    rows, seq_len = len(plan.indices), plan.seq_len
    if rows > batch_size:
        raise ValueError(f"a batch of {rows} examples does not fit batch_size={batch_size}")
    input_ids = np.zeros((batch_size, seq_len), np.int32)
    token_type_ids = np.zeros((batch_size, seq_len), np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    for row, index in enumerate(plan.indices):
        n = split.lengths[index]
        input_ids[row, :n] = split.input_ids[index]
        token_type_ids[row, :n] = split.token_type_ids[index]
        segment_ids[row, :n] = 1
    labels = np.zeros((batch_size,), split.labels.dtype)
    labels[:rows] = split.labels[plan.indices]
    weights = np.zeros((batch_size,), np.float32)
    weights[:rows] = 1.0
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, segment_ids=segment_ids,
                labels=labels, weights=weights)
