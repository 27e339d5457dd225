"""The data entry of pretraining: this process's train/eval batch iterators from the data config,
and what the model must know about the data (its vocab size, its tokenizer file)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import ml_collections

from mosaicbert_jax.data.batches import MLMBatches
from mosaicbert_jax.data.embedded import prepare_embedded
from mosaicbert_jax.data.shards import check_vocab_fits
from mosaicbert_jax.data.synthetic import SyntheticMLMBatches

SOURCES = ("shards", "embedded", "synthetic")
TOKENIZER_FILE = "tokenizer.json"  # what `prepare` writes next to the shards


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The iterators (this process's rows of each global batch) and the model's vocab size:
    the data's padded vocab, or the vocab the config asks for once checked to hold the data."""

    train: Any
    eval: Any
    vocab_size: int
    tokenizer_file: Optional[str]  # the data's tokenizer; None for synthetic batches


def resolve_shards_dir(data: ml_collections.ConfigDict) -> str:
    """The prepared shards to read: the embedded corpus (prepared on first use) or a path."""
    if data.source == "embedded":
        cache = os.path.join(os.path.expanduser(data.cache_dir), "embedded")
        return prepare_embedded(cache, vocab_size=data.embedded_vocab_size)
    if not data.shards_dir:
        raise ValueError("config.data.shards_dir is empty: prepare a corpus with "
                         "`python -m mosaicbert_jax.data.prepare` and pass "
                         "--config.data.shards_dir=<its output dir>, or use "
                         "--config.data.source=embedded for the built-in corpus")
    path = os.path.expanduser(data.shards_dir)
    if not os.path.isdir(path):
        raise ValueError(f"config.data.shards_dir={path!r} does not exist; run "
                         f"`python -m mosaicbert_jax.data.prepare` to create it")
    return path


def make_training_data(data: ml_collections.ConfigDict, per_process_batch: int, seed: int,
                       process_index: int, process_count: int,
                       model_vocab_size: int = -1) -> TrainingData:
    """Builds the iterators of `data.source`. `model_vocab_size` is config.model.vocab_size:
    <= 0 follows the data; a set vocab is what synthetic batches draw from, and what the
    shards' tokenizer must fit in."""
    if data.source not in SOURCES:
        raise ValueError(f"config.data.source={data.source!r}; use one of {SOURCES}")
    if data.source == "synthetic":
        vocab_size = model_vocab_size if model_vocab_size > 0 else data.synthetic_vocab_size
        mean = data.synthetic_mean_doc_len or None
        make = lambda prob, s: SyntheticMLMBatches(
            per_process_batch, data.seq_len, vocab_size, prob, seed=s * 1000,
            mean_doc_len=mean, process_index=process_index, process_count=process_count)
        return TrainingData(make(data.mask_prob, seed), make(data.eval_mask_prob, seed + 1),
                            vocab_size, tokenizer_file=None)
    shards = resolve_shards_dir(data)
    make = lambda split, prob: MLMBatches(
        shards, split=split, batch_size=per_process_batch, seq_len=data.seq_len,
        mask_prob=prob, seed=seed, process_index=process_index, process_count=process_count,
        repeat=True)
    train = make("train", data.mask_prob)
    if model_vocab_size <= 0:
        vocab_size = train.vocab_size
    else:
        check_vocab_fits(train.tokenizer_vocab_size, model_vocab_size)
        vocab_size = model_vocab_size
    tokenizer_file = os.path.join(shards, TOKENIZER_FILE)
    return TrainingData(train, make("eval", data.eval_mask_prob), vocab_size,
                        tokenizer_file if os.path.isfile(tokenizer_file) else None)
