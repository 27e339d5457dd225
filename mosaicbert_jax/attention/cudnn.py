"""Baseline: jax.nn.dot_product_attention (cuDNN on GPU) with the bias materialised.

ALiBi and the segment mask become one [batch, heads, seq, seq] additive bias, which is
what a library without in-kernel ALiBi needs; it is here as the yardstick the Pallas
kernel is measured against. Off GPU (or for dtypes cuDNN lacks) it runs JAX's XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mosaicbert_jax.attention.reference import alibi_bias, visibility_mask

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def materialised_bias(segment_ids: jax.Array, slopes: jax.Array, seq_len: int,
                      dtype, window: int = 0) -> jax.Array:
    """[batch, heads, seq, seq] ALiBi plus a large negative where the mask (segments, and
    the sliding window when window > 0) forbids."""
    # Half the dtype's most negative value: finite, and far below any real logit.
    blocked = jnp.finfo(dtype).min / 2
    visible = visibility_mask(segment_ids, window)[:, None]
    bias = jnp.where(visible, alibi_bias(slopes, seq_len)[None], blocked)
    return jax.lax.stop_gradient(bias.astype(dtype))


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    slopes: jax.Array, scale: float, window: int = 0) -> jax.Array:
    """q, k, v: [batch, seq, heads, head_dim]; rows with no visible key return zeros;
    window > 0 masks keys with |i - j| > window (in the materialised bias)."""
    on_gpu = jax.default_backend() == "gpu"
    implementation = "cudnn" if on_gpu and q.dtype in _CUDNN_DTYPES else None
    bias = materialised_bias(segment_ids, slopes, q.shape[1], q.dtype, window)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                       implementation=implementation)
    query_is_real = (segment_ids != 0)[:, :, None, None]
    return jnp.where(query_is_real, out, 0).astype(q.dtype)
