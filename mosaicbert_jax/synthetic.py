"""Synthetic packed MLM batches (random tokens, mixed document lengths) for benchmarks and tests.

Same batch format and state protocol as the real data iterator, with no corpus needed.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

FIRST_REGULAR_ID = 5  # ids below are special tokens ([PAD]=0, [UNK], [CLS], [SEP], [MASK])


class SyntheticMLMBatches:
    """Rows packed with random documents; `mask_prob` of each row's real tokens selected."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, mask_prob: float = 0.3,
                 seed: int = 0, mean_doc_len: Optional[int] = None, fill: float = 1.0,
                 mask_token_id: int = 4, max_predictions: Optional[int] = None):
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.mask_prob, self.seed, self.fill = mask_prob, seed, fill
        self.mean_doc_len = mean_doc_len or seq_len
        self.mask_token_id = mask_token_id
        self.max_predictions = max_predictions or max(1, math.ceil(mask_prob * seq_len))
        self._index = 0

    def get_state(self) -> dict:
        return {"index": self._index}

    def set_state(self, state: dict) -> None:
        self._index = int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self._index])
        self._index += 1
        b, s, k = self.batch_size, self.seq_len, self.max_predictions
        ids = rng.integers(FIRST_REGULAR_ID, self.vocab_size, size=(b, s), dtype=np.int32)
        segments = np.zeros((b, s), np.int32)
        real = int(round(self.fill * s))
        for row in range(b):
            start, doc = 0, 1
            while start < real:
                length = int(min(real - start, max(2, rng.exponential(self.mean_doc_len))))
                segments[row, start:start + length] = doc
                start, doc = start + length, doc + 1
        ids[segments == 0] = 0
        n_select = min(k, int(round(self.mask_prob * real)))
        positions = np.zeros((b, k), np.int32)
        weights = np.zeros((b, k), np.float32)
        for row in range(b):
            positions[row, :n_select] = np.sort(rng.choice(real, n_select, replace=False))
        weights[:, :n_select] = 1.0
        labels = np.take_along_axis(ids, positions, axis=1) * (weights > 0)
        np.put_along_axis(ids, positions[:, :n_select], self.mask_token_id, axis=1)
        return {"input_ids": ids, "segment_ids": segments, "masked_positions": positions,
                "masked_weights": weights, "masked_labels": labels.astype(np.int32)}
