"""XLA reference attention: softmax(QK^T * scale - slope_h * |i - j| + segment mask) V.

Plain jnp, runs everywhere; it is what the kernels are checked against. An optional
sliding window w > 0 also masks keys with |i - j| > w.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so rows with no visible key give a uniform softmax that is then zeroed (no NaN).
MASK_VALUE = -1e30


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, q, k] True where query and key share a document and the key is not padding."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & (segment_ids[:, None, :] != 0)


def window_mask(seq_len: int, window: int) -> jax.Array:
    """[seq, seq] True where |i - j| <= window (window > 0; 0 means no window)."""
    pos = jnp.arange(seq_len)
    return jnp.abs(pos[:, None] - pos[None, :]) <= window


def visibility_mask(segment_ids: jax.Array, window: int = 0) -> jax.Array:
    """[batch, q, k] segment mask, intersected with the sliding window when window > 0."""
    mask = segment_mask(segment_ids)
    if window:
        mask = mask & window_mask(segment_ids.shape[1], window)[None]
    return mask


def alibi_bias(slopes: jax.Array, seq_len: int) -> jax.Array:
    """[heads, seq, seq] fp32 bias -slope_h * |i - j| (materialised; reference only)."""
    pos = jnp.arange(seq_len, dtype=jnp.float32)
    distance = jnp.abs(pos[:, None] - pos[None, :])
    return -jnp.asarray(slopes, jnp.float32)[:, None, None] * distance[None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                  slopes: jax.Array, scale: float, window: int = 0) -> jax.Array:
    """q, k, v: [batch, seq, heads, head_dim]; segment_ids: [batch, seq] (0 = padding);
    window > 0: query i sees only keys with |i - j| <= window."""
    seq_len = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * scale + alibi_bias(slopes, seq_len)[None]
    mask = visibility_mask(segment_ids, window)[:, None]
    logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
