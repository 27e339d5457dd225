"""Model FLOPs as the spec counts them, for tokens/s -> MFU."""

from __future__ import annotations

from typing import Any, Optional

from mosaicbert_jax.config import MosaicBertConfig

# Dense bf16 peak TFLOP/s per chip by device_kind substring (datasheet values).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0),
)


def training_flops_per_token(cfg: MosaicBertConfig, seq_len: int,
                             masked_fraction: float) -> float:
    """6 x (encoder matmul params + MLM head params x masked fraction) + attention matmuls.

    Counts every token of a row (padding included) and full seq_len attention, as the spec
    does (about 0.73 GFLOP per token for base at 128 tokens and 30% masking).
    """
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = h * 3 * h + h * h + h * 2 * i + i * h
    encoder = cfg.num_hidden_layers * per_layer
    head = (h * h + h * cfg.vocab_size) * masked_fraction
    attention = 12 * seq_len * h * cfg.num_hidden_layers  # fwd 4*S*h, x3 for training
    return 6.0 * (encoder + head) + attention


def peak_tflops(device: Any) -> Optional[float]:
    """Datasheet bf16 peak of a jax device, or None when unknown (e.g. CPU)."""
    kind = getattr(device, "device_kind", "")
    for name, value in PEAK_BF16_TFLOPS:
        if name.lower() in kind.lower():
            return value
    return None
