"""One dense layer's three GEMMs in FP8, its activations quantised by a kernel (fp8_gemm "mlp_qkv").

y = FP8(x) @ FP8(W) as a custom_vjp whose float8 GEMMs all take operands laid out
contraction-dim-last (cuBLASLt's only FP8 form on Hopper): `fused.quantize_fp8` writes x and,
in the backward, the output cotangent g as float8 row-major and transposed with their amaxes in
one pass each, so no GEMM waits on an XLA transpose; only the weight is quantised by XLA.
The model uses it for the fused QKV projection (768 -> 2304 in BERT-base: 0.483 ms a layer in
bf16 and 0.267 in FP8 with operands ready, `benchmarks/fp8_gemm_probe.py --gemms-only`).

Scaling is fp8.py's delayed per-tensor scaling: stats "input" (x), "kernel" (W) and
"output_grad" (g); their "cotangents" are the amaxes seen (fp8.seen_stats), as for
fp8.fp8_matmul.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax

from mosaicbert_jax import fp8, fused

_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [m, k] x [n, k] -> [m, n]


def gemm(a: jax.Array, b: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    """a [m, k] . b [n, k] (both float8, contraction last) -> [m, n] in dtype, times scale."""
    return fp8.scaled_dot(a, b, _CONTRACT_LAST, scale, dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dense(x: jax.Array, w: jax.Array, stats: dict, implementation: str,
          dtype: Any) -> jax.Array:
    """x [m, k] @ W [k, n] in FP8, result in dtype. stats: tensor -> (scale, amax_history) for
    tensor in fp8.TENSORS; implementation: quantize_fp8's (fused.resolve)."""
    return forward(x, w, stats, implementation, dtype)[0]


def forward(x: jax.Array, w: jax.Array, stats: dict, implementation: str, dtype: Any):
    """(y, residuals) of the op's forward, for `dense` and for ops that end in its GEMMs
    (fused/fp8_attention.py); the residuals feed `grads_from_float8`."""
    e4m3 = fp8.FORWARD_DTYPE
    (sx, hx), (sw, hw) = stats["input"], stats["kernel"]
    qx, qx_t, x_amax = fused.quantize_fp8(x, 1.0 / sx, e4m3, implementation)
    qw = fp8.quantize(w, e4m3, sw)                             # [k, n]
    y = gemm(qx, qw.T, fp8.gemm_scale(stats, "forward"), dtype)  # [m, n]
    new = {"input": fp8.seen_stats_from_amax(x_amax, hx),
           "kernel": fp8.seen_stats(w, hw)}
    scales = (fp8.gemm_scale(stats, "input_grad"), fp8.gemm_scale(stats, "kernel_grad"))
    return y, (qx_t, qw, scales, stats["output_grad"], fp8.stats_cotangent(stats, new))


def output_grad_scale(residuals) -> jax.Array:
    """The scale the output cotangent is quantised at (its "output_grad" stats' scale)."""
    return residuals[3][0]


def grads_from_float8(residuals, qg: jax.Array, qg_t: jax.Array, g_amax: jax.Array,
                      dtype: Any):
    """(dx, dW, the stats' cotangents) from the output cotangent already quantised at
    output_grad_scale (qg [m, n], qg_t [n, m]) and its amax."""
    qx_t, qw, (input_grad_scale, kernel_grad_scale), (_, hg), new = residuals
    dx = gemm(qg, qw, input_grad_scale, dtype)                 # [m, k]
    dw = gemm(qx_t, qg_t, kernel_grad_scale, dtype)            # [k, n]
    return dx, dw, {**new, "output_grad": fp8.seen_stats_from_amax(g_amax, hg)}


def _dense_fwd(x, w, stats, implementation, dtype):
    return forward(x, w, stats, implementation, dtype)


def _dense_bwd(implementation, dtype, residuals, g):
    qg, qg_t, g_amax = fused.quantize_fp8(g, 1.0 / output_grad_scale(residuals),
                                          fp8.BACKWARD_DTYPE, implementation)
    return grads_from_float8(residuals, qg, qg_t, g_amax, dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
