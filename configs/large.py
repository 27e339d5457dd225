"""MosaicBERT-large pretraining on C4 (same recipe as base, larger model)."""

from mosaicbert_jax.training.defaults import get_default_config


def get_config():
    config = get_default_config()
    config.model.preset = "large"
    config.data.source = "shards"
    config.train.global_batch_size = 4096
    config.train.steps = 70_000
    config.optimizer.lr = 2e-4
    return config
