"""The embedded default: a tiny MosaicBERT on the corpus that ships with Python, on a laptop CPU.

  python -m mosaicbert_jax.train --config=configs/tiny.py --workdir=/tmp/mosaicbert-tiny
"""

from mosaicbert_jax.training.defaults import get_default_config


def get_config():
    config = get_default_config()
    config.model.preset = "tiny"
    config.model.dtype = "float32"
    config.data.source = "embedded"
    config.data.seq_len = 128
    config.train.global_batch_size = 32
    config.train.steps = 600
    config.train.log_every = 50
    config.train.eval_every = 200
    config.train.eval_batches = 8
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 2
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_fraction = 0.06
    config.mesh.data = -1
    config.mesh.fsdp = 1
    return config
