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
        attention_window=0,         # 0: full attention; w: keys within w tokens (docs/attention.md)
        global_attention_every=0,   # with a window: layers 0, n, 2n, ... stay global (0: none)
        vocab_size=-1,              # -1: the preset's (30528 for bert-base-uncased)
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
