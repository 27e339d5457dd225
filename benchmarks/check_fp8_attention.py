"""Checks and times the FP8 attention backward that writes d(qkv) as float8 (fused/fp8_attention.py).

  PYTHONPATH=.:tests python benchmarks/check_fp8_attention.py

First, compiled on this GPU and on fresh random packed layouts (tests/fp8_attention_cases.py):
the kernels' float8 d(qkv) and its transpose against the plain bf16 backward followed by the
quantize kernel, and the whole op (FP8 QKV projection + attention) against fused/fp8_dense.py's
op followed by the attention. In the Pallas interpreter (the CPU tests) both are bit-identical.
Compiled, the two dK/dV kernels are separate Triton programs whose float32 sums may round
apart, so here at most 1e-5 of the float8 values may sit one code away (a bf16 rounding flip
before the quantisation, or a sign flip of a value that rounds to zero; 1 of 2,359,296
in the first run), the amaxes and bias gradients
agree to float32 summation order, the forward output is bit-identical and the gradients
agree to 1e-3.
Then times the two backwards at the base step's shape (--batch 256 x 128 tokens, 12 heads of
64) and prints a table. Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from attention_cases import fresh_rng, random_packed_layouts, relative_error
from fused_ops import median_ms
from fp8_attention_cases import (assert_same_bits, bits, kernel_grads,
                                 op_outputs_and_grads)
from mosaicbert_jax import fp8, fused
from mosaicbert_jax.attention import alibi_slopes, pallas_gpu

E5M2 = fp8.BACKWARD_DTYPE


def _codes_apart(a: jax.Array, b: jax.Array) -> np.ndarray:
    """Per element, how many float8 codes a and b lie apart along the number line (0 for +0
    and -0): the float8 values decoded and ranked among every finite value of the dtype."""
    finite = np.unique(np.arange(256, dtype=np.uint8).view(a.dtype).astype(np.float32))
    finite = finite[np.isfinite(finite)]
    rank = lambda x: np.searchsorted(finite, np.asarray(x.astype(jnp.float32)))
    return np.abs(rank(a) - rank(b))


def assert_kernels_agree(got, want, what: str) -> None:
    """The float8 d(qkv) layouts within one code of each other at <= 1e-5 of the values;
    amax and d(bias) to float32 summation order."""
    (q, q_t, amax), d_bias = got
    (want_q, want_t, want_amax), want_bias = want
    for name, a, b in (("d(qkv)", q, want_q), ("d(qkv) transposed", q_t, want_t)):
        apart = _codes_apart(a, b)
        assert apart.max() <= 1, (name, int(apart.max()), what)
        assert np.mean(apart > 0) <= 1e-5, (name, float(np.mean(apart > 0)), what)
    assert abs(float(amax) / float(want_amax) - 1) < 8e-3, what  # one bf16 ulp
    assert relative_error(d_bias, want_bias) < 1e-4, what


def assert_op_agrees(got, want, what: str) -> None:
    """The same forward bytes; gradients and amaxes within 1e-3 of the two-op path's."""
    assert_same_bits(got[0], want[0], what)
    for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        if not np.any(np.asarray(b, np.float32)):  # the stats histories' zero cotangents
            assert not np.any(np.asarray(a, np.float32)), what
            continue
        assert relative_error(a, b) < 1e-3, (relative_error(a, b), what)


def time_backwards(batch: int, seq: int, heads: int, head_dim: int) -> dict:
    """ms of the plain backward + quantize pass and of the float8-writing backward."""
    rng = np.random.default_rng(0)
    segments = jnp.asarray(random_packed_layouts(rng, batch, seq))
    qkv = jnp.asarray(rng.standard_normal((batch, seq, 3, heads, head_dim)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((3, heads, head_dim)) * 0.3, jnp.bfloat16)
    slopes = jnp.asarray(alibi_slopes(heads), jnp.float32)
    sizes = pallas_gpu.fp8_grad_block_sizes(seq, head_dim)
    scale = head_dim ** -0.5
    out, lse = jax.jit(lambda: pallas_gpu.qkv_forward(qkv, bias, segments, slopes, scale,
                                                      sizes))()
    d_out = jnp.asarray(rng.standard_normal(out.shape), jnp.bfloat16)
    inv = jnp.float32(1000.0)

    @jax.jit
    def plain(d_out, inv):
        d_qkv, d_bias = pallas_gpu._backward(qkv, qkv, qkv, segments, slopes, out, lse, d_out,
                                             scale, sizes, False, 0, pallas_gpu.QKV_SLOTS,
                                             bias)
        return fused.quantize_fp8(d_qkv.reshape(batch * seq, -1), inv, E5M2, "pallas"), d_bias

    @jax.jit
    def in_kernel(d_out, inv):
        return pallas_gpu.qkv_backward_fp8(qkv, bias, segments, slopes, out, lse, d_out, scale,
                                           sizes, inv, E5M2)
    return {"bf16 backward + quantize_fp8": median_ms(plain, d_out, inv, reps=50),
            "float8 d(qkv) from the kernels": median_ms(in_kernel, d_out, inv, reps=50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--batch", type=int, default=256, help="rows of the timed case")
    args = parser.parse_args()
    for seq in map(int, args.seqs.split(",")):
        for draw in range(args.draws):
            rng, seed = fresh_rng()
            window = 0 if draw % 2 == 0 else 48
            got, want, clipped = kernel_grads(rng, False, 8, seq, 12, 64, window)
            assert_kernels_agree(got, want, f"kernels seq {seq} seed {seed} window {window}")
            apart = sum(int(np.sum(_codes_apart(a, b) > 0)) for a, b in zip(got[0][:2],
                                                                            want[0][:2]))
            got, want = op_outputs_and_grads(rng, "pallas", 8, seq, 12, 64, window)
            assert_op_agrees(got, want, f"op seq {seq} seed {seed} window {window}")
            print(f"seq {seq} window {window}: kernels and op agree with the two-op path "
                  f"({apart} float8 values one code apart; {100 * clipped:.3f}% clipped; "
                  f"seed {seed})", flush=True)
    timings = time_backwards(args.batch, 128, 12, 64)
    print(f"\nattention backward of one layer, {args.batch} x 128 tokens, 12 heads x 64, "
          f"{jax.devices()[0].device_kind}:")
    print("| backward | ms |\n| --- | --- |")
    for name, ms in timings.items():
        print(f"| {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
