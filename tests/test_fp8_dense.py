"""The FP8 dense op (fused/fp8_dense.py, the QKV projection under fp8_gemm "mlp_qkv"): output
and gradients against the float32 dense, the op against the same float8 products recomputed
step by step, the stats it writes against the true amaxes, and the quantize kernel (Pallas
interpreter) against the XLA composition inside it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicbert_jax import fp8, fused
from mosaicbert_jax.fused import fp8_dense
from attention_cases import fresh_rng, relative_error

E4M3, E5M2 = fp8.FORWARD_DTYPE, fp8.BACKWARD_DTYPE


def _case(rng):
    m, k, n = int(rng.choice([32, 64, 96])), int(rng.choice([32, 64])), int(rng.choice([48, 96]))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    g = jnp.asarray(rng.standard_normal((m, n)) * 1e-3, jnp.float32)
    return x, w, g


def _amax(v) -> float:
    return float(jnp.max(jnp.abs(v)))


def _stats(x, w, g, history_length: int = 4) -> dict:
    """Scales mapping each tensor's amax to fmax (what delayed scaling settles to)."""
    return {"input": (jnp.float32(_amax(x) / 448), jnp.zeros(history_length)),
            "kernel": (jnp.float32(_amax(w) / 448), jnp.zeros(history_length)),
            "output_grad": (jnp.float32(_amax(g) / 57344), jnp.zeros(history_length))}


def _run(impl, x, w, g, stats, dtype):
    def run(x, w, stats):
        y, vjp = jax.vjp(lambda x, w, s: fp8_dense.dense(x, w, s, impl, dtype), x, w, stats)
        return (y,) + vjp(g.astype(dtype))
    return jax.jit(run)(x.astype(dtype), w.astype(dtype), stats)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_fp8_dense_is_the_float8_product_and_writes_the_true_amaxes(impl):
    rng, seed_value = fresh_rng()
    x, w, g = _case(rng)
    stats = _stats(x, w, g)
    y, dx, dw, new = _run(impl, x, w, g, stats, jnp.float32)
    what = f"impl={impl} (seed {seed_value})"
    exact = (x @ w, g @ w.T, x.T @ g)
    # e4m3 rounds each operand by ~2.6% rms, e5m2 by twice that: two roundings per product.
    # Float32 alone would be ~1e-6; a wrong scale or a transposed operand is off far more.
    for name, got, want in zip(("y", "dx", "dw"), (y, dx, dw), exact):
        error = relative_error(got, want)
        assert 5e-3 < error < 0.12, (name, error, what)
    # The same float8 operands multiplied in float32: the op is exactly that product.
    q = lambda v, d, s: fused.reference.to_fp8(v, 1.0 / s, d).astype(jnp.float32) * s
    qw = fp8.quantize(w, E4M3, stats["kernel"][0]).astype(jnp.float32) * stats["kernel"][0]
    qx, qg = q(x, E4M3, stats["input"][0]), q(g, E5M2, stats["output_grad"][0])
    for name, got, want in zip(("y", "dx", "dw"), (y, dx, dw), (qx @ qw, qg @ qw.T, qx.T @ qg)):
        assert relative_error(got, want) < 1e-5, (name, what)
    for tensor, value in (("input", x), ("kernel", w), ("output_grad", g)):
        # The stats' "cotangents": the amax seen in the scale's slot, zeros for the history.
        seen, zeros = new[tensor]
        assert float(seen) == pytest.approx(_amax(value), rel=1e-6), (tensor, what)
        assert zeros.shape == (4,) and np.all(np.asarray(zeros) == 0)


def test_fp8_dense_kernel_and_composition_agree_in_bf16():
    """With bf16 operands the interpreted quantize kernel and the XLA composition give the
    same float8 operands, so the two runs of the op agree to bf16 output rounding."""
    rng, seed_value = fresh_rng()
    x, w, g = _case(rng)
    stats = _stats(x, w, g)
    kernel = _run("pallas_interpret", x, w, g, stats, jnp.bfloat16)
    composition = _run("xla", x, w, g, stats, jnp.bfloat16)
    for got, want in zip(jax.tree_util.tree_leaves(kernel),
                         jax.tree_util.tree_leaves(composition)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                      err_msg=f"seed {seed_value}")
    exact = relative_error(kernel[0], x @ w)
    assert 5e-3 < exact < 0.12, (exact, seed_value)
