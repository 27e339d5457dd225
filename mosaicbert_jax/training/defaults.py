"""The full set of training config keys with defaults; configs/*.py start from here.

Every key a config may set exists here, so a misspelled key is caught before anything runs.
"""

from __future__ import annotations

import difflib

import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Continued pretraining: start from this checkpoint's parameters (any layout
    # checkpoint.load_pretrained reads, or a hub name such as mosaicml/mosaic-bert-base),
    # optimizer and schedule fresh; "" = random init. Ignored once the workdir has a checkpoint.
    c.init_from = ""
    c.model = ml_collections.ConfigDict(dict(
        preset="base",              # base | large | tiny
        dtype="bfloat16",           # compute dtype; parameters stay float32
        attention_implementation="auto",
        remat=False,
        hidden_dropout_prob=0.1,
        dropout_rng="hash",         # hash (fused, no stored mask) | threefry (flax nn.Dropout)
        # fused kernels for GLU+dropout and bias+dropout+residual+LayerNorm (mosaicbert_jax/fused):
        glu_implementation="auto",        # auto (Pallas on CUDA GPUs) | xla | pallas
        layernorm_implementation="auto",  # auto | xla | pallas
        mlm_loss_implementation="auto",   # the MLM loss: auto (= xla, measured faster) |
                                          # xla | pallas (a row kernel: fused/mlm_loss.py)
        attention_window=0,         # 0: full attention; w: keys within w tokens (docs/attention.md)
        global_attention_every=0,   # with a window: layers 0, n, 2n, ... stay global (0: none)
        vocab_size=-1,              # -1: the preset's (30528 for bert-base-uncased)
        fp8=False,                  # FP8 GEMMs with delayed scaling (mosaicbert_jax/fp8.py)
        fp8_amax_history=16,        # amaxes each FP8 scale is taken over
        fp8_gemm="encoder",         # encoder (every encoder GEMM, quantised by our kernels:
                                    # fastest measured) | mlp_qkv (the MLP and the QKV
                                    # projection) | mlp (the MLP) | f8 (every large GEMM,
                                    # float8 operands, quantised by XLA) | qdq
        fp8_qkv_grad_in_attention=True,  # the attention backward writes d(qkv) as float8
                                    # (mlp_qkv/encoder with Pallas GPU attention; same bytes)
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="shards",            # shards (prepared dir) | embedded | synthetic
        shards_dir="",              # from `python -m mosaicbert_jax.data.prepare`
        cache_dir="~/.cache/mosaicbert_jax",  # where the embedded corpus is prepared
        embedded_vocab_size=8192,
        seq_len=128,
        mask_prob=0.3,
        eval_mask_prob=0.15,
        synthetic_mean_doc_len=0,   # 0: one document per row
        synthetic_vocab_size=30528,  # synthetic batches' vocab unless model.vocab_size is set
    ))
    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=4096,
        microbatches=1,             # gradient accumulation steps per optimizer step
        steps=70_000,
        seed=17,
        log_every=100,
        eval_every=2000,
        eval_batches=20,
        checkpoint_every=2000,
        keep_checkpoints=3,
        async_checkpointing=True,
        peak_tflops_per_device=0.0,  # 0: datasheet value for the device (for MFU)
        distributed="auto",         # auto | yes | no: jax.distributed.initialize()
    ))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=1e-5,
        warmup_fraction=0.06, final_lr_fraction=0.02, clip_norm=0.0,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c


PHASE2_TOKENS_PER_BATCH = 4096 * 128  # the 128-token recipe's tokens per step


def get_phase2_config(seq_len: int) -> ml_collections.ConfigDict:
    """Phase 2 of MosaicBERT-base pretraining at `seq_len` tokens, continued (init_from) from a
    128-token checkpoint; configs/phase2_{512,1024,2048}.py. See docs/long_context.md.

    How the numbers were chosen (what the sources say, and where it is our choice):
    - The released mosaicml/mosaic-bert-base-seqlen-{256,512,1024,2048} model cards say only that
      each "was trained with ALiBi on a sequence length of" N tokens; they give no batch size,
      learning rate or token count, so nothing below is copied from them.
    - Batch: 524,288 tokens (1024 x 512, 512 x 1024, 256 x 2048), the same tokens per step as
      the 128-token recipe (4096 x 128). ModernBERT did the same when it extended its context
      (arXiv 2412.13663, Table 3: base went from 4608 x 1024 to 576 x 8192, 4.7M tokens per
      batch either way).
    - Learning rate 2e-4, 40% of the recipe's 5e-4 peak. ModernBERT's extension ran at 3e-4 against
      its 8e-4 main phase (37.5%), constant for 250B tokens and then decayed over 50B (Table 3, as a
      summary of the paper found by our search gives it; we did not read the table itself). We keep
      about the same ratio; the exact 2e-4, and a linear decay instead of a constant phase, are our
      choice, not measured.
    - Warmup 6% of the steps, as the recipe: the optimizer state is fresh (init_from keeps only the
      parameters), so Adam's second moments need a warmup again. Decay to 2% of peak, as the recipe.
    - Steps 7,000 (3.7B tokens, 10% of the 128-token phase's 70,000 x 524,288 = 36.7B): our
      choice of budget, the same at every length so the phase-2 runs compare at equal tokens.
    - ALiBi needs no change: the biases are computed for any length (no position table to extend).
    - microbatches=1: raise it (--config.train.microbatches=2, 4) if a step does not fit; memory at
      this length is still to be measured on a GPU (docs/long_context.md gives the command).
    """
    c = get_default_config()
    # A path that does not exist, so a run without --config.init_from stops with an error
    # naming it instead of silently training from scratch.
    c.init_from = "REQUIRED:--config.init_from=<128-token checkpoint>"
    c.model.preset = "base"
    c.data.source = "shards"
    c.data.seq_len = seq_len
    c.train.global_batch_size = PHASE2_TOKENS_PER_BATCH // seq_len
    c.train.steps = 7_000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.seed = 17
    c.optimizer.lr = 2e-4
    c.optimizer.warmup_fraction = 0.06
    c.optimizer.final_lr_fraction = 0.02
    return c


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming any key not in the defaults, with the closest valid key."""
    known = _flat_keys(get_default_config())
    unknown = [k for k in _flat_keys(config) if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError("unknown config keys: " + ", ".join(hints))
