"""Synthetic token corpora with C4-like document lengths, for tests and the throughput benchmark."""

from __future__ import annotations

import numpy as np

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
