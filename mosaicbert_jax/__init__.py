"""MosaicBERT in JAX/Flax: fast, cheap BERT pretraining with ALiBi flash attention and packing."""

from mosaicbert_jax.attention import alibi_slopes, attention
from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.model import (
    MosaicBertForMaskedLM,
    MosaicBertForSequenceClassification,
    MosaicBertModel,
    check_inputs,
    count_params,
)

__version__ = "0.1.0"

__all__ = [
    "MosaicBertConfig",
    "MosaicBertForMaskedLM",
    "MosaicBertForSequenceClassification",
    "MosaicBertModel",
    "alibi_slopes",
    "attention",
    "check_inputs",
    "count_params",
]
