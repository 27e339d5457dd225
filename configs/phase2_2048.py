"""Phase 2 of MosaicBERT-base pretraining at 2048 tokens, continued from a 128-token checkpoint.

  python -m mosaicbert_jax.train --config=configs/phase2_2048.py \
      --config.init_from=/runs/base --config.data.shards_dir=/data/c4-bert --workdir=/runs/base-2048

--config.init_from is required: a 128-token run's workdir, a save_pretrained folder, or a
converted release (`convert from-torch --src mosaicml/mosaic-bert-base`). See docs/long_context.md.

How the numbers were chosen (what the sources say, and where it is our choice):
- The released mosaicml/mosaic-bert-base-seqlen-{256,512,1024,2048} model cards say only that
  each "was trained with ALiBi on a sequence length of" N tokens; they give no batch size, learning
  rate or token count, so nothing below is copied from them.
- Batch: 256 x 2048 = 524,288 tokens, the same tokens per step as the 128-token recipe
  (4096 x 128). ModernBERT did the same when it extended its context (arXiv 2412.13663, Table 3:
  base went from 4608 x 1024 to 576 x 8192, 4.7M tokens per batch either way).
- Learning rate 2e-4, 40% of the recipe's 5e-4 peak. ModernBERT's extension ran at 3e-4 against
  its 8e-4 main phase (37.5%), constant for 250B tokens and then decayed over 50B (Table 3, as a
  summary of the paper found by our search gives it; we did not read the table itself). We keep
  about the same ratio; the exact 2e-4, and a linear decay instead of a constant phase, are our
  choice, not measured.
- Warmup 6% of the steps, as the recipe: the optimizer state is fresh (init_from keeps only the
  parameters), so Adam's second moments need a warmup again. Decay to 2% of peak, as the recipe.
- Steps 7,000 (3.7B tokens, 10% of the 128-token phase's 70,000 x 524,288 = 36.7B): our choice of
  budget, the same at every length so the phase-2 runs compare at equal tokens.
- ALiBi needs no change: the biases are computed for any length (no position table to extend).
- microbatches=1: raise it (--config.train.microbatches=2, 4) if a step does not fit; memory at
  this length is still to be measured on a GPU (docs/long_context.md gives the command).
"""

from mosaicbert_jax.training.defaults import get_default_config

SEQ_LEN = 2048
TOKENS_PER_BATCH = 4096 * 128  # the 128-token recipe's


def get_config():
    config = get_default_config()
    # A path that does not exist, so a run without --config.init_from stops with an error
    # naming it instead of silently training from scratch.
    config.init_from = "REQUIRED:--config.init_from=<128-token checkpoint>"
    config.model.preset = "base"
    config.data.source = "shards"
    config.data.seq_len = SEQ_LEN
    config.train.global_batch_size = TOKENS_PER_BATCH // SEQ_LEN  # 256
    config.train.steps = 7_000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.seed = 17
    config.optimizer.lr = 2e-4
    config.optimizer.warmup_fraction = 0.06
    config.optimizer.final_lr_fraction = 0.02
    return config
