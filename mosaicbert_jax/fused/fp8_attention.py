"""The FP8 QKV projection and the attention after it as one op, whose attention backward writes
d(qkv) as float8 itself (model.fp8_qkv_grad_in_attention, on by default with fp8_gemm
"mlp_qkv" and "encoder" when the attention runs the Pallas GPU kernels).

fused/fp8_dense.py followed by the attention kernels computes the same thing in two ops: the
attention backward writes d(qkv) in bf16 and the dense op's backward then reads it once more
to quantise it (fused.quantize_fp8: 0.092 ms a layer in the FP8 base step on an H200). Here
the dQ and dK/dV kernels quantise their own tiles (attention/pallas_gpu.qkv_backward_fp8), so
the two FP8 gradient GEMMs read what the kernels wrote. The float8 bytes, amaxes and every
other value are those of the two-op composition: the kernels round each tile to bf16 first,
as the bf16 d(qkv) they replace was rounded.

Stats and variables are fp8_dense.dense's (input, kernel, output_grad of the Wqkv layer), so
the two paths share checkpoints.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from mosaicbert_jax import fp8
from mosaicbert_jax.fused import fp8_dense

# The attention implementations whose kernels write the float8 d(qkv) -> interpret flag.
_KERNELS = {"pallas": False, "pallas_interpret": True}


def _kernels():
    # Imported when used, as the attention registry loads its implementations.
    from mosaicbert_jax.attention import pallas_gpu
    return pallas_gpu


def supported(attention_implementation: str, seq: int, head_dim: int) -> bool:
    """Whether `qkv_attention` runs for this (resolved) attention implementation and shape;
    where not, the model keeps fused/fp8_dense.py's op and attention_qkv."""
    return (attention_implementation in _KERNELS
            and _kernels().fp8_grad_block_sizes(seq, head_dim) is not None)


def qkv_attention(x: jax.Array, kernel: jax.Array, bias: jax.Array, stats: dict,
                  segment_ids: jax.Array, slopes: jax.Array, *, heads: int,
                  attention_implementation: str, quantize_implementation: str,
                  window: int = 0, dtype: Any = jnp.bfloat16) -> jax.Array:
    """ALiBi attention of the FP8 projection x [batch, seq, hidden] @ kernel [hidden, 3 *
    hidden] + bias, as [batch, seq, hidden] in dtype. stats: fp8_dense.dense's; segment_ids
    [batch, seq] (0 = padding); slopes [heads]; quantize_implementation: fused.quantize_fp8's
    for x (fused.resolve). Needs supported(attention_implementation, seq, head_dim)."""
    batch, seq, hidden = x.shape
    head_dim = kernel.shape[1] // (3 * heads)
    if not supported(attention_implementation, seq, head_dim):
        raise ValueError(f"qkv_attention needs a Pallas GPU attention implementation and a "
                         f"sequence its blocks tile; got {attention_implementation!r}, seq "
                         f"{seq}, head_dim {head_dim}")
    static = (heads, attention_implementation, quantize_implementation, int(window), dtype)
    bias = jnp.reshape(bias, (3, heads, head_dim)).astype(dtype)
    out = _qkv_attention(x.reshape(batch * seq, hidden).astype(dtype), kernel.astype(dtype),
                         bias, stats, segment_ids.astype(jnp.int32),
                         jnp.asarray(slopes, jnp.float32), static)
    return out.reshape(batch, seq, hidden)


def _unpack(static, segment_ids, head_dim: int):
    heads, attention, quantize, window, dtype = static
    sizes = _kernels().fp8_grad_block_sizes(segment_ids.shape[1], head_dim)
    return heads, _KERNELS[attention], quantize, window, dtype, sizes


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _qkv_attention(x, w, bias, stats, segment_ids, slopes, static):
    return _forward(x, w, bias, stats, segment_ids, slopes, static)[0]


def _forward(x, w, bias, stats, segment_ids, slopes, static):
    head_dim = bias.shape[-1]
    heads, interpret, quantize, window, dtype, sizes = _unpack(static, segment_ids, head_dim)
    y, dense_residuals = fp8_dense.forward(x, w, stats, quantize, dtype)
    batch, seq = segment_ids.shape
    qkv = y.reshape(batch, seq, 3, heads, head_dim)
    out, lse = _kernels().qkv_forward(qkv, bias, segment_ids, slopes, head_dim ** -0.5, sizes,
                                      interpret, window)
    residuals = (dense_residuals, qkv, bias, segment_ids, slopes, out, lse)
    return out.reshape(batch * seq, heads * head_dim), residuals


def _backward(static, residuals, g):
    dense_residuals, qkv, bias, segment_ids, slopes, out, lse = residuals
    head_dim = bias.shape[-1]
    _, interpret, _, window, dtype, sizes = _unpack(static, segment_ids, head_dim)
    (qg, qg_t, g_amax), d_bias = _kernels().qkv_backward_fp8(
        qkv, bias, segment_ids, slopes, out, lse, g.reshape(out.shape), head_dim ** -0.5,
        sizes, 1.0 / fp8_dense.output_grad_scale(dense_residuals), fp8.BACKWARD_DTYPE,
        interpret, window)
    rows, width = g.shape[0], qkv.shape[2] * qkv.shape[3] * head_dim
    dx, dw, seen = fp8_dense.grads_from_float8(dense_residuals, qg.reshape(rows, width),
                                               qg_t.reshape(width, rows), g_amax, dtype)
    return dx, dw, d_bias.astype(bias.dtype), seen, None, jnp.zeros_like(slopes)


_qkv_attention.defvjp(_forward, _backward)


def resolve_use(enabled: bool, dense_roles: frozenset, attention_implementation: str,
                seq: int, head_dim: int) -> bool:
    """Whether the model runs qkv_attention: the switch is on, the QKV projection is an FP8
    dense op (fp8.dense_op_roles) and the kernels support the shape."""
    return (enabled and "qkv" in dense_roles
            and supported(attention_implementation, seq, head_dim))


__all__ = ["qkv_attention", "resolve_use", "supported"]
