"""Synthetic packed MLM batches (random tokens, mixed document lengths) for benchmarks and tests.

Same batch format and state protocol as the real data iterator, with no corpus needed. Row r of
global batch n is a pure function of (seed, n * global batch + r), so process p of P yields the
rows p * batch_size onwards of each global batch and the global batches do not depend on P.
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
                 mask_token_id: int = 4, max_predictions: Optional[int] = None,
                 process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count="
                             f"{process_count})")
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.process_index, self.global_batch_size = process_index, batch_size * process_count
        self.mask_prob, self.seed, self.fill = mask_prob, seed, fill
        self.mean_doc_len = mean_doc_len or seq_len
        self.mask_token_id = mask_token_id
        self.max_predictions = max_predictions or max(1, math.ceil(mask_prob * seq_len))
        self._index = 0

    def get_state(self) -> dict:
        """Global batches yielded (the same on every process) and the global batch size."""
        return {"index": self._index, "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict) -> None:
        saved = state.get("global_batch_size", self.global_batch_size)
        if saved != self.global_batch_size:
            raise ValueError(f"saved data state has global_batch_size={saved} but this iterator "
                             f"has global_batch_size={self.global_batch_size}; resume with the "
                             f"same data settings")
        self._index = int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first_row = self._index * self.global_batch_size + self.process_index * self.batch_size
        self._index += 1
        rows = [self._row(first_row + r) for r in range(self.batch_size)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def _row(self, global_row: int) -> dict:
        rng = np.random.default_rng([self.seed, global_row])
        s, k = self.seq_len, self.max_predictions
        ids = rng.integers(FIRST_REGULAR_ID, self.vocab_size, size=s, dtype=np.int32)
        segments = np.zeros(s, np.int32)
        real = int(round(self.fill * s))
        start, doc = 0, 1
        while start < real:
            length = int(min(real - start, max(2, rng.exponential(self.mean_doc_len))))
            segments[start:start + length] = doc
            start, doc = start + length, doc + 1
        ids[segments == 0] = 0
        n_select = min(k, int(round(self.mask_prob * real)))
        positions = np.zeros(k, np.int32)
        weights = np.zeros(k, np.float32)
        positions[:n_select] = np.sort(rng.choice(real, n_select, replace=False))
        weights[:n_select] = 1.0
        labels = (ids[positions] * (weights > 0)).astype(np.int32)
        ids[positions[:n_select]] = self.mask_token_id
        return {"input_ids": ids, "segment_ids": segments, "masked_positions": positions,
                "masked_weights": weights, "masked_labels": labels}
