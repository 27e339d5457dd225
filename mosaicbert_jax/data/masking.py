"""BERT MLM masking with static shapes: an exact share of each row's tokens, 80/10/10 replaced.

A row with n maskable tokens (non-special, non-padding) selects floor(mask_prob * n + u) of
them, u uniform in [0, 1), uniformly at random: mask_prob * n on average (unbiased rounding, so
the rate over a corpus is mask_prob, not skewed by rows of equal length) and never more than
ceil(mask_prob * (seq_len - 2)) slots, the default max_predictions. Of the selected tokens 80%
become [MASK], 10% a random non-special token, 10% stay unchanged.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np

from mosaicbert_jax.data.tokenizer import SpecialTokens

MASK_TOKEN_SHARE = 0.8
RANDOM_TOKEN_SHARE = 0.1


def max_predictions_for(seq_len: int, mask_prob: float) -> int:
    """Most selections a row can get: each row holds at least one [CLS] and one [SEP]."""
    return math.ceil(mask_prob * (seq_len - 2))


class MaskingTables:
    """Lookup tables for masking: which ids are special, and the ids random replacement uses."""

    def __init__(self, vocab_size: int, padded_vocab_size: int, special: SpecialTokens):
        self.special = special
        self.is_special = np.zeros(padded_vocab_size, bool)
        self.is_special[list(special.ids)] = True
        self.replacement_ids = np.flatnonzero(~self.is_special[:vocab_size]).astype(np.int32)


def mask_rows(input_ids: np.ndarray, rng: np.random.Generator, mask_prob: float,
              max_predictions: int, tables: MaskingTables) -> Dict[str, np.ndarray]:
    """Masks `input_ids` [B, S] in place; returns it with masked_positions/weights/labels [B, K].

    Valid slots come first in each row, positions ascending; empty slots hold position 0,
    weight 0 and label 0.
    """
    batch_size, seq_len = input_ids.shape
    maskable = ~tables.is_special[input_ids]
    rounding = rng.random(batch_size)
    num_selected = np.floor(maskable.sum(axis=1) * mask_prob + rounding).astype(np.int64)
    if num_selected.max(initial=0) > max_predictions:
        raise ValueError(f"a row needs {num_selected.max()} masked slots but max_predictions="
                         f"{max_predictions}; raise max_predictions")
    keys = rng.random((batch_size, seq_len), dtype=np.float32)
    keys[~maskable] = 2.0  # never among the smallest: specials and padding are not selected
    # The candidates are each row's smallest keys, ranked, so that a row takes its first
    # num_selected; with room for more slots than tokens, every position is a candidate.
    candidates = min(max_predictions, seq_len)
    if candidates < seq_len:
        order = np.argpartition(keys, candidates - 1, axis=1)[:, :candidates]
    else:
        order = np.broadcast_to(np.arange(seq_len), (batch_size, seq_len))
    ranked = np.take_along_axis(order, np.argsort(np.take_along_axis(keys, order, 1), axis=1), 1)
    if candidates < max_predictions:
        ranked = np.pad(ranked, ((0, 0), (0, max_predictions - candidates)),
                        constant_values=seq_len)
    valid = np.arange(max_predictions)[None, :] < num_selected[:, None]
    positions = np.where(valid, ranked, seq_len)
    positions.sort(axis=1)
    positions[~valid] = 0
    labels = np.take_along_axis(input_ids, positions, axis=1)
    labels[~valid] = 0

    choice = rng.random((batch_size, max_predictions), dtype=np.float32)
    random_ids = tables.replacement_ids[
        rng.integers(0, len(tables.replacement_ids), (batch_size, max_predictions))]
    new_ids = np.where(choice < MASK_TOKEN_SHARE, tables.special.mask,
                       np.where(choice < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE, random_ids, labels))
    rows = np.broadcast_to(np.arange(batch_size)[:, None], valid.shape)
    input_ids[rows[valid], positions[valid]] = new_ids[valid]
    return {
        "input_ids": input_ids,
        "masked_positions": positions.astype(np.int32),
        "masked_weights": valid.astype(np.float32),
        "masked_labels": labels.astype(np.int32),
    }
