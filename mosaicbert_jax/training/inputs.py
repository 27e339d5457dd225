"""Builds this process's train/eval batch iterators from the data config."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.synthetic import SyntheticMLMBatches

SOURCES = ("shards", "embedded", "synthetic")


def resolve_shards_dir(data: ml_collections.ConfigDict) -> str:
    """The prepared shards to read: the embedded corpus (prepared on first use) or a path."""
    if data.source == "embedded":
        from mosaicbert_jax.data.embedded import prepare_embedded
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


def make_iterators(data: ml_collections.ConfigDict, per_process_batch: int, vocab_size: int,
                   seed: int, process_index: int, process_count: int) -> tuple[Any, Any]:
    """(train, eval) iterators yielding this process's rows of each global batch."""
    if data.source not in SOURCES:
        raise ValueError(f"config.data.source={data.source!r}; use one of {SOURCES}")
    if data.source == "synthetic":
        mean = data.synthetic_mean_doc_len or None
        make = lambda prob, s: SyntheticMLMBatches(
            per_process_batch, data.seq_len, vocab_size, prob, seed=s * 1000,
            mean_doc_len=mean, process_index=process_index, process_count=process_count)
        return make(data.mask_prob, seed), make(data.eval_mask_prob, seed + 1)
    from mosaicbert_jax.data import MLMBatches
    shards = resolve_shards_dir(data)
    make = lambda split, prob: MLMBatches(
        shards, split=split, batch_size=per_process_batch, seq_len=data.seq_len,
        mask_prob=prob, seed=seed, process_index=process_index, process_count=process_count,
        repeat=True)
    return make("train", data.mask_prob), make("eval", data.eval_mask_prob)


def fit_model_vocab(model_cfg: MosaicBertConfig, train_iter: Any,
                    explicit: bool) -> MosaicBertConfig:
    """The model's vocab for this data: the data's padded vocab unless the config sets one,
    which must then hold every token id of the data."""
    tokenizer_vocab = getattr(train_iter, "tokenizer_vocab_size", None)
    if tokenizer_vocab is None:  # synthetic batches are drawn from the model's vocab
        return model_cfg
    if not explicit:
        return model_cfg.replace(vocab_size=train_iter.vocab_size)
    from mosaicbert_jax.data import check_vocab_fits
    check_vocab_fits(tokenizer_vocab, model_cfg.vocab_size)
    return model_cfg
