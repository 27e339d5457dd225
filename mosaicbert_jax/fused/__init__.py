"""Fused memory-bound ops of a MosaicBERT layer, chosen by name like the attention kernels.

`glu_dropout(h, seed, rate, implementation)`: dropout(gelu(a) * b) for h = [a | b].
`dropout_add_layernorm(x, residual, scale, bias, seed, rate, eps, x_bias, implementation)`:
LayerNorm(dropout(x + x_bias) + residual), x_bias being the bias of the dense layer before.
`glu_dropout_fp8` / `glu_dropout_fp8_grad`: the GLU and its gradient written as float8 (for
the FP8 MLP, fused/fp8_mlp.py); `quantize_fp8`: a tensor as float8 in both layouts, with its
amax (the FP8 ops' x and dy). Implementations: "xla" (the plain composition in
reference.py, the model's unfused path), "pallas" (mosaicbert_jax/fused/pallas_gpu.py, GPU),
"pallas_interpret" (the same kernels in the Pallas interpreter, any backend: for tests), and
"auto" (pallas on CUDA GPUs of compute capability >= 8.0, xla elsewhere). Every path drops
the same elements for the same seed (dropout.keep_from_position).
"""

from __future__ import annotations

from typing import Optional

import jax

from mosaicbert_jax.attention import gpu_supports_pallas
from mosaicbert_jax.config import FUSED_IMPLEMENTATIONS as IMPLEMENTATIONS
from mosaicbert_jax.fused import reference


def resolve(implementation: str, width: int, dropout_rng: str = "hash",
            backend_has_pallas: Optional[bool] = None) -> str:
    """The implementation that runs: 'auto' becomes pallas or xla; others are checked."""
    from mosaicbert_jax.fused import pallas_gpu
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"fused implementation {implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}")
    if implementation == "xla":
        return "xla"
    fits = pallas_gpu.supports(width) and dropout_rng == "hash"
    if implementation == "auto":
        has_pallas = ((jax.default_backend() == "gpu" and gpu_supports_pallas())
                      if backend_has_pallas is None else backend_has_pallas)
        return "pallas" if fits and has_pallas else "xla"
    if dropout_rng != "hash":
        raise ValueError(f"the fused kernels draw hash dropout masks, not {dropout_rng!r}; "
                         f"set dropout_rng='hash' or the fused implementation to 'xla'")
    if not pallas_gpu.supports(width):
        raise ValueError(f"the fused kernels need a width that is a multiple of 16; got "
                         f"{width}; use the 'xla' implementation")
    return implementation


def glu_dropout(h: jax.Array, seed: jax.Array, rate: float,
                implementation: str = "auto") -> jax.Array:
    """dropout(gelu(a) * b) for h = [a | b] on the last axis, in h's dtype."""
    impl = resolve(implementation, h.shape[-1] // 2)
    if impl == "xla":
        return reference.glu_dropout(h, seed, rate)
    from mosaicbert_jax.fused import pallas_gpu
    return pallas_gpu.glu_dropout(h, seed, rate, interpret=impl == "pallas_interpret")


def glu_dropout_fp8(h: jax.Array, seed: jax.Array, rate: float, inv_scale: jax.Array,
                    fp8_dtype, implementation: str = "auto"):
    """glu_dropout of h [rows, 2w] times inv_scale as fp8_dtype: (q [rows, w], q transposed,
    float32 amax before quantising); the FP8 MLP's forward (fused/fp8_mlp.py)."""
    impl = resolve(implementation, h.shape[-1] // 2)
    if impl == "xla":
        return reference.glu_dropout_fp8(h, seed, rate, inv_scale, fp8_dtype)
    from mosaicbert_jax.fused import pallas_gpu
    return pallas_gpu.glu_dropout_fp8(h, seed, rate, inv_scale, fp8_dtype,
                                      interpret=impl == "pallas_interpret")


def glu_dropout_fp8_grad(h: jax.Array, g: jax.Array, seed: jax.Array, rate: float,
                         inv_scale: jax.Array, fp8_dtype, implementation: str = "auto"):
    """glu_dropout's gradient at h for cotangent g, times inv_scale as fp8_dtype: (q [rows,
    2w], q transposed, float32 amax); the FP8 MLP's backward."""
    impl = resolve(implementation, g.shape[-1])
    if impl == "xla":
        return reference.glu_dropout_fp8_grad(h, g, seed, rate, inv_scale, fp8_dtype)
    from mosaicbert_jax.fused import pallas_gpu
    return pallas_gpu.glu_dropout_fp8_grad(h, g, seed, rate, inv_scale, fp8_dtype,
                                           interpret=impl == "pallas_interpret")


def quantize_fp8(x: jax.Array, inv_scale: jax.Array, fp8_dtype,
                 implementation: str = "auto"):
    """x [rows, w] times inv_scale as fp8_dtype: (q, q transposed, float32 amax of x): the
    input and output gradient of the FP8 MLP and FP8 dense ops in the two layouts their
    GEMMs take."""
    impl = resolve(implementation, x.shape[-1])
    if impl == "xla":
        return reference.quantize_fp8(x, inv_scale, fp8_dtype)
    from mosaicbert_jax.fused import pallas_gpu
    return pallas_gpu.quantize_fp8(x, inv_scale, fp8_dtype,
                                   interpret=impl == "pallas_interpret")


def dropout_add_layernorm(x: jax.Array, residual: jax.Array, scale: jax.Array,
                          bias: jax.Array, seed: jax.Array, rate: float, eps: float,
                          x_bias: Optional[jax.Array] = None, *,
                          implementation: str = "auto", copies: int = 1):
    """LayerNorm(dropout(x + x_bias) + residual) on the last axis, in x's dtype.

    copies = 2 returns the output twice (for two consumers); the Pallas backward adds their
    cotangents in its kernel, where autodiff would add them in a pass of its own."""
    impl = resolve(implementation, x.shape[-1])
    if impl == "xla":
        y = reference.dropout_add_layernorm(x, residual, scale, bias, seed, rate, eps, x_bias)
        return y if copies == 1 else (y,) * copies
    from mosaicbert_jax.fused import pallas_gpu
    return pallas_gpu.dropout_add_layernorm(x, residual, scale, bias, seed, rate, eps, x_bias,
                                            interpret=impl == "pallas_interpret",
                                            copies=copies)


__all__ = ["IMPLEMENTATIONS", "dropout_add_layernorm", "glu_dropout", "glu_dropout_fp8",
           "glu_dropout_fp8_grad", "quantize_fp8", "resolve"]
