"""MosaicBERT-base on a TPU v5e slice (e.g. v5litepod-256, 16 GiB HBM a chip); see docs/launch.md.

137M parameters plus Adam state fit on every chip, so the mesh is pure data parallelism.
v4 slices take the same config. Several slices: --config.mesh.data=<slices> --config.mesh.fsdp=-1.
"""

from mosaicbert_jax.training.defaults import get_default_config


def get_config():
    config = get_default_config()
    config.model.preset = "base"
    config.model.attention_implementation = "auto"  # the Pallas TPU kernel on TPU
    config.data.source = "shards"
    config.data.seq_len = 128
    config.train.global_batch_size = 4096           # 16 rows a chip on 256 chips
    config.train.steps = 70_000
    config.train.seed = 17
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    return config
