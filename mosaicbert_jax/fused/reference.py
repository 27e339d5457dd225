"""The plain XLA compositions the fused kernels replace: what the unfused model computes.

GELU is exact (erf) in float32; dropout is `hash_dropout`; LayerNorm statistics are float32
as in flax's nn.LayerNorm. These are the references of the kernel tests and the fallback.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mosaicbert_jax.dropout import hash_dropout
from mosaicbert_jax.fp8 import to_fp8  # noqa: F401  (the kernels' quantiser, re-exported)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, evaluated in float32 whatever x's dtype (as PyTorch does)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False)


def _dropout(x: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
    return hash_dropout(x, seed, float(rate)) if rate > 0.0 else x


def glu_dropout(h: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
    """dropout(gelu(a) * b) for h = [a | b] on the last axis, in h's dtype."""
    width = h.shape[-1] // 2
    gated, non_gated = h[..., :width], h[..., width:]
    out = (gelu(gated) * non_gated.astype(jnp.float32)).astype(h.dtype)
    return _dropout(out, seed, rate)


def quantize_fp8(y: jax.Array, inv_scale: jax.Array, fp8_dtype):
    """(q, q.T, amax) of y [rows, width]: y times inv_scale as fp8_dtype, its transpose, and
    the float32 max |y| (what delayed scaling records)."""
    q = to_fp8(y, inv_scale, fp8_dtype)
    return q, q.T, jnp.max(jnp.abs(y)).astype(jnp.float32)


def glu_dropout_fp8(h: jax.Array, seed: jax.Array, rate: float, inv_scale: jax.Array,
                    fp8_dtype):
    """(q, q.T, amax) of glu_dropout(h) in float32 times inv_scale as fp8_dtype (h: [rows, 2w])."""
    return quantize_fp8(glu_dropout(h.astype(jnp.float32), seed, rate), inv_scale, fp8_dtype)


def glu_dropout_fp8_grad(h: jax.Array, g: jax.Array, seed: jax.Array, rate: float,
                         inv_scale: jax.Array, fp8_dtype):
    """(q, q.T, amax) of glu_dropout's float32 gradient at h for cotangent g, as fp8_dtype."""
    _, vjp = jax.vjp(lambda h: glu_dropout(h, seed, rate), h.astype(jnp.float32))
    return quantize_fp8(vjp(g.astype(jnp.float32))[0], inv_scale, fp8_dtype)


def layernorm(z: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with float32 statistics, output in z's dtype."""
    z32 = z.astype(jnp.float32)
    mean = jnp.mean(z32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z32 - mean), axis=-1, keepdims=True)
    y = (z32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(z.dtype)


def dropout_add_layernorm(x: jax.Array, residual: jax.Array, scale: jax.Array,
                          bias: jax.Array, seed: jax.Array, rate: float, eps: float,
                          x_bias: Optional[jax.Array] = None) -> jax.Array:
    """LayerNorm(dropout(x + x_bias) + residual) on the last axis, in x's dtype."""
    if x_bias is not None:
        x = x + x_bias.astype(x.dtype)
    return layernorm(_dropout(x, seed, rate) + residual.astype(x.dtype), scale, bias, eps)
