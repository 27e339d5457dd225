"""MosaicBertConfig: every architectural number of the spec in one frozen dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from mosaicbert_jax.attention import available_implementations
from mosaicbert_jax.fp8 import GEMMS as FP8_GEMMS, kernel_quantized

DROPOUT_RNGS = ("hash", "threefry")
# The MLM head's LayerNorm eps: the original PyTorch MosaicBERT hard-codes it, whatever
# layer_norm_eps says (spec: 1e-12), so converted checkpoints compute what the original does.
MLM_HEAD_LAYER_NORM_EPS = 1e-12
# Fused memory-bound ops (mosaicbert_jax/fused): auto = Pallas kernels on CUDA GPUs, else XLA.
FUSED_IMPLEMENTATIONS = ("auto", "xla", "pallas", "pallas_interpret")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(value: Any) -> Any:
    """Accepts a jnp dtype or its name ('bfloat16', 'float32', 'float16')."""
    if isinstance(value, str):
        if value not in _DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[value]
    return value


@dataclasses.dataclass(frozen=True)
class MosaicBertConfig:
    """Sizes, dropouts and numerics of a MosaicBERT encoder (defaults: MosaicBERT-base)."""

    vocab_size: int = 30528
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # ALiBi has no length limit; None means any length. Set it to reject longer inputs.
    max_sequence_length: Optional[int] = None
    # Numerics: `dtype` is the compute dtype, `param_dtype` the master-weight dtype.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"
    # Sliding-window (local) attention: 0 = full attention; w > 0 = query i sees only keys
    # with |i - j| <= w (still within its own document). With global_attention_every = n > 0,
    # layers 0, n, 2n, ... stay global (ModernBERT's rule); 0 = every layer uses the window.
    attention_window: int = 0
    global_attention_every: int = 0
    # Dropout masks: "hash" (fused, recomputed in the backward; see dropout.py) or "threefry"
    # (flax nn.Dropout).
    dropout_rng: str = "hash"
    # GLU activation + dropout, and dropout + residual + LayerNorm: fused kernels or the plain
    # XLA composition (see mosaicbert_jax/fused). The fused kernels draw hash dropout masks.
    glu_implementation: str = "auto"
    layernorm_implementation: str = "auto"
    # The MLM loss over the decoder logits: "pallas", one row kernel that also writes the
    # gradient, or the plain XLA composition ("xla"; "auto" = xla, measured faster on an
    # H200: mosaicbert_jax/fused/mlm_loss.py).
    mlm_loss_implementation: str = "auto"
    # Rematerialise each layer's activations in the backward pass (saves memory).
    remat: bool = False
    # FP8 (e4m3 forward, e5m2 output gradients, delayed scaling) for the encoder's large GEMMs:
    # Wqkv, attention output, GLU up and down (mosaicbert_jax/fp8.py). Off until the
    # learning-curve benchmark shows parity; the scaling stats keep `fp8_amax_history` amaxes.
    fp8: bool = False
    fp8_amax_history: int = 16
    # How the FP8 GEMMs are written for XLA: "f8" (float8 operands), "qdq", "mlp" (only the
    # GLU MLP in FP8, quantised inside its kernels: fused/fp8_mlp.py), "mlp_qkv" (that and
    # the QKV projection: fused/fp8_dense.py) or "encoder" (and the attention output
    # projection: every encoder GEMM); see fp8.GEMMS.
    fp8_gemm: str = "encoder"
    # With the QKV projection an FP8 dense op ("mlp_qkv", "encoder") and the Pallas GPU
    # attention: the attention backward writes d(qkv) as float8 itself (fused/fp8_attention.py;
    # the same bytes as a quantize pass after it, one pass fewer). False: that pass.
    fp8_qkv_grad_in_attention: bool = True
    num_labels: int = 2
    classifier_dropout_prob: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick a head count that divides it")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                     "intermediate_size", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.attention_implementation not in available_implementations():
            raise ValueError(
                f"attention_implementation={self.attention_implementation!r} is not one of "
                f"{available_implementations()} (add one with "
                f"mosaicbert_jax.attention.register_implementation)")
        for name in ("attention_window", "global_attention_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative int (0 turns it off)")
        if self.dropout_rng not in DROPOUT_RNGS:
            raise ValueError(f"dropout_rng={self.dropout_rng!r} is not one of {DROPOUT_RNGS}")
        for name in ("glu_implementation", "layernorm_implementation"):
            value = getattr(self, name)
            if value not in FUSED_IMPLEMENTATIONS:
                raise ValueError(f"{name}={value!r} is not one of {FUSED_IMPLEMENTATIONS}")
            if value.startswith("pallas") and self.dropout_rng != "hash":
                raise ValueError(f"{name}={value!r} draws hash dropout masks but dropout_rng="
                                 f"{self.dropout_rng!r}; use dropout_rng='hash' or {name}='xla'")
        if self.mlm_loss_implementation not in FUSED_IMPLEMENTATIONS:
            raise ValueError(f"mlm_loss_implementation={self.mlm_loss_implementation!r} is not "
                             f"one of {FUSED_IMPLEMENTATIONS}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"fp8={self.fp8!r} must be True or False")
        if not isinstance(self.fp8_qkv_grad_in_attention, bool):
            raise ValueError(f"fp8_qkv_grad_in_attention={self.fp8_qkv_grad_in_attention!r} "
                             f"must be True or False")
        if self.fp8_gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm={self.fp8_gemm!r} must be one of "
                             + ", ".join(map(repr, FP8_GEMMS)))
        if self.fp8 and kernel_quantized(self.fp8_gemm) and self.dropout_rng != "hash":
            raise ValueError(f"fp8_gemm={self.fp8_gemm!r} drops the MLP's activations with "
                             f"hash dropout masks but dropout_rng={self.dropout_rng!r}; use "
                             f"dropout_rng='hash' or fp8_gemm='f8'")
        if (isinstance(self.fp8_amax_history, bool) or not isinstance(self.fp8_amax_history, int)
                or self.fp8_amax_history < 1):
            raise ValueError(f"fp8_amax_history={self.fp8_amax_history!r} must be an int >= 1 "
                             f"(16 is usual)")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> "MosaicBertConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def base(cls, **overrides: Any) -> "MosaicBertConfig":
        """MosaicBERT-base: 768 hidden, 12 heads, 12 layers (137.4M parameters with the MLM head)."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides: Any) -> "MosaicBertConfig":
        """MosaicBERT-large: 1024 hidden, 16 heads, 24 layers, 4096 intermediate."""
        values = dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24,
                      intermediate_size=4096)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides: Any) -> "MosaicBertConfig":
        """A few-layer model for tests and the CPU quickstart."""
        values = dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=2,
                      intermediate_size=256)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MosaicBertConfig":
        presets = {"base": cls.base, "large": cls.large, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; use one of {sorted(presets)}")
        return presets[name](**overrides)
