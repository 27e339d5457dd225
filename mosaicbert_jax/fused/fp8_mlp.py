"""The GLU MLP's two GEMMs in FP8, its wide tensors quantised by the GLU kernels (fp8_gemm "mlp").

y = FP8(dropout(gelu(a) * b)) @ W_down with [a | b] = FP8(x) @ W_up, as one custom_vjp whose
four float8 GEMMs all take operands laid out contraction-dim-last (cuBLASLt's only FP8 form on
Hopper), so no FP8 GEMM waits on a transpose of a wide tensor: the GLU forward kernel writes
the hidden activation as e4m3 twice, row-major (the next GEMM's input) and transposed (the
input of W_down's gradient), plus its amax; the GLU backward kernel does the same for d([a|b])
in e5m2. The hidden_size-wide x and output cotangent go through `fused.quantize_fp8` (one
pass: both layouts and the amax); only the weights are quantised and transposed by XLA.
`benchmarks/fp8_gemm_probe.py --gemms-only` measured such GEMMs 1.7-1.9x faster than bf16 at
the base model's MLP shapes on an H200.

Scaling is fp8.py's delayed per-tensor scaling, in two stat groups: "up" (input x, kernel
W_up, output_grad d([a|b])) and "down" (input: the hidden activation, kernel W_down,
output_grad: dy); the stats' "cotangents" are the amaxes seen (fp8.seen_stats), as for
fp8.fp8_matmul.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from mosaicbert_jax import fp8, fused
from mosaicbert_jax.fused.fp8_dense import gemm as _gemm


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def glu_mlp(x: jax.Array, w_up: jax.Array, w_down: jax.Array, seed: jax.Array, up: dict,
            down: dict, rate: float, implementation: str, dtype: Any) -> jax.Array:
    """dropout(glu(x @ W_up)) @ W_down for x [m, k], W_up [k, 2f], W_down [f, n], in FP8.

    up / down: tensor -> (scale, amax_history) for tensor in fp8.TENSORS (module docstring);
    seed, rate: the hash dropout of the hidden activation; implementation: the GLU kernels'
    (fused.resolve: pallas on GPU, xla or pallas_interpret elsewhere). Result in dtype."""
    return _glu_mlp_fwd(x, w_up, w_down, seed, up, down, rate, implementation, dtype)[0]


def _glu_mlp_fwd(x, w_up, w_down, seed, up, down, rate, implementation, dtype):
    e4m3 = fp8.FORWARD_DTYPE
    (sx, hx), (swu, hwu) = up["input"], up["kernel"]
    (sh, hh), (swd, hwd) = down["input"], down["kernel"]
    qx, qx_t, x_amax = fused.quantize_fp8(x, 1.0 / sx, e4m3, implementation)
    qwu = fp8.quantize(w_up, e4m3, swu)                        # [k, 2f]
    ab = _gemm(qx, qwu.T, fp8.gemm_scale(up, "forward"), dtype)  # [m, 2f]
    qh, qh_t, h_amax = fused.glu_dropout_fp8(ab, seed, rate, 1.0 / sh, e4m3, implementation)
    qwd = fp8.quantize(w_down, e4m3, swd)                      # [f, n]
    y = _gemm(qh, qwd.T, fp8.gemm_scale(down, "forward"), dtype)  # [m, n]
    new_up = fp8.stats_cotangent(up, {"input": fp8.seen_stats_from_amax(x_amax, hx),
                                      "kernel": fp8.seen_stats(w_up, hwu)})
    new_down = fp8.stats_cotangent(down, {"input": fp8.seen_stats_from_amax(h_amax, hh),
                                          "kernel": fp8.seen_stats(w_down, hwd)})
    grad_scales = tuple(fp8.gemm_scale(stats, gemm) for stats in (up, down)
                        for gemm in ("input_grad", "kernel_grad"))
    residuals = (qx_t, qwu, ab, seed, qh_t, qwd, grad_scales,
                 (up["output_grad"], down["output_grad"]), new_up, new_down)
    return y, residuals


def _glu_mlp_bwd(rate, implementation, dtype, residuals, g):
    e5m2 = fp8.BACKWARD_DTYPE
    qx_t, qwu, ab, seed, qh_t, qwd, grad_scales, grad_stats, new_up, new_down = residuals
    up_input_grad, up_kernel_grad, down_input_grad, down_kernel_grad = grad_scales
    (sgu, hgu), (sgd, hgd) = grad_stats
    qg, qg_t, g_amax = fused.quantize_fp8(g, 1.0 / sgd, e5m2, implementation)  # [m, n]
    dh = _gemm(qg, qwd, down_input_grad, dtype)                # [m, f]
    d_w_down = _gemm(qh_t, qg_t, down_kernel_grad, dtype)      # [f, n]
    qd, qd_t, d_amax = fused.glu_dropout_fp8_grad(ab, dh, seed, rate, 1.0 / sgu, e5m2,
                                                  implementation)
    dx = _gemm(qd, qwu, up_input_grad, dtype)                  # [m, k]
    d_w_up = _gemm(qx_t, qd_t, up_kernel_grad, dtype)          # [k, 2f]
    new_up = {**new_up, "output_grad": fp8.seen_stats_from_amax(d_amax, hgu)}
    new_down = {**new_down, "output_grad": fp8.seen_stats_from_amax(g_amax, hgd)}
    return dx, d_w_up, d_w_down, None, new_up, new_down


glu_mlp.defvjp(_glu_mlp_fwd, _glu_mlp_bwd)


def glu_mlp_reference(x: jax.Array, w_up: jax.Array, w_down: jax.Array, seed: jax.Array,
                      rate: float, dtype: Any) -> jax.Array:
    """The same MLP without FP8 (what the model computes with fp8 off), for tests."""
    ab = jnp.dot(x.astype(dtype), w_up.astype(dtype))
    return jnp.dot(fused.reference.glu_dropout(ab, seed, rate), w_down.astype(dtype))
