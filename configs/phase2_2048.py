"""Phase 2 of MosaicBERT-base pretraining at 2048 tokens (batch 256), from a 128-token checkpoint.

  python -m mosaicbert_jax.train --config=configs/phase2_2048.py \
      --config.init_from=/runs/base --config.data.shards_dir=/data/c4-bert --workdir=/runs/base-2048

--config.init_from is required: a 128-token run's workdir, a save_pretrained folder, or a
converted release (`convert from-torch --src mosaicml/mosaic-bert-base`). How batch, learning
rate and steps were chosen: mosaicbert_jax.training.defaults.get_phase2_config; see
docs/long_context.md.
"""

from mosaicbert_jax.training.defaults import get_phase2_config


def get_config():
    return get_phase2_config(2048)
