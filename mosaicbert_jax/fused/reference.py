"""The plain XLA compositions the fused kernels replace: what the unfused model computes.

GELU is exact (erf) in float32; dropout is `hash_dropout`; LayerNorm statistics are float32
as in flax's nn.LayerNorm. These are the references of the kernel tests and the fallback.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mosaicbert_jax.dropout import hash_dropout


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
