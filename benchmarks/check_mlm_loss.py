"""Checks and times the MLM loss's Pallas row kernel (fused/mlm_loss.py) against the XLA
composition, compiled on this GPU at the base step's shape.

  PYTHONPATH=.:tests python benchmarks/check_mlm_loss.py [--rows 9728] [--draws 2]
      [--variants 'chunk=0,num_warps=16;rows=4,chunk=2048,num_warps=8']

Each draw: fresh random bf16 logits (offset by 80, so a shift is needed), bias, labels and
0/1 weights; the two implementations' loss and correct sums and their gradients w.r.t. the
logits and the bias (value_and_grad, as the train step takes it). The loss agrees to float32
summation order (2e-6) and the count exactly; the logits' gradient to one bf16 value (the
float32 values, a few ulps apart from exp and summation order, round to neighbours where they
straddle a rounding boundary); the bias gradient (summed from the bf16 gradient here, from float32 there) within
one bf16 step of the summed magnitudes. Every RowBlocks variant in --variants is checked
(the whole-row kernel and the chunked one). Then times XLA and each variant (forward +
backward of the loss alone) and prints a table. Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fused_ops import median_ms, require_gpu
from mlm_loss_cases import BF16_STEP, bf16_ulps_apart
from mosaicbert_jax.fused import mlm_loss


# RowBlocks variants checked and timed beside XLA: the whole-row kernel, then the chunked one.
VARIANTS = ("chunk=0,num_warps=16", "chunk=0,num_warps=32", "rows=1,chunk=2048,num_warps=4",
            "rows=2,chunk=2048,num_warps=4", "rows=4,chunk=1024,num_warps=4",
            "rows=4,chunk=2048,num_warps=8", "rows=8,chunk=1024,num_warps=8")


def loss_and_grads(impl: str, blocks: mlm_loss.RowBlocks = mlm_loss.RowBlocks()):
    """jit of (sums, (d_logits, d_bias)) for one implementation."""
    def loss(logits, bias, labels, weights):
        sums = mlm_loss.masked_lm_sums(logits, labels, weights, bias, impl, blocks)
        return sums["loss_sum"], sums
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def draw(rng, rows: int, vocab: int):
    logits = jnp.asarray(rng.standard_normal((rows, vocab)) * 4 + 80, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(vocab) * 0.5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, rows), jnp.int32)
    weights = jnp.asarray(rng.random(rows) > 0.1, jnp.float32)
    return logits, bias, labels, weights


def check(got, want, what: str) -> str:
    """Asserts the agreement the module docstring states; returns a line of what it saw."""
    (_, g_sums), (g_logits, g_bias) = got
    (_, w_sums), (w_logits, w_bias) = want
    assert float(g_sums["correct_sum"]) == float(w_sums["correct_sum"]), what
    loss_err = abs(float(g_sums["loss_sum"]) / float(w_sums["loss_sum"]) - 1)
    assert loss_err < 2e-6, (loss_err, what)
    # Two float32 values a few ulps apart round to bf16 neighbours where they straddle a
    # rounding boundary: at most one bf16 value apart.
    apart = bf16_ulps_apart(g_logits, w_logits)
    assert apart.max() <= 1, (int(apart.max()), what)
    magnitudes = np.abs(np.asarray(w_logits, np.float32)).sum(0)
    bias_err = np.abs(np.asarray(g_bias) - np.asarray(w_bias))
    assert np.all(bias_err <= BF16_STEP * magnitudes + 1e-5), (float(bias_err.max()), what)
    return (f"loss {loss_err:.1e} apart, {np.mean(apart > 0):.1e} of the gradient one bf16 "
            f"value apart, bias gradient within {float(np.max(bias_err / (magnitudes + 1e-30))):.1e}"
            f" of the summed magnitudes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=9728, help="masked slots (256 x 38)")
    parser.add_argument("--vocab", type=int, default=30528)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="';'-separated RowBlocks overrides, e.g. 'rows=4,chunk=2048'")
    args = parser.parse_args()
    require_gpu(parser)
    plain = loss_and_grads("xla")
    variants = {}
    for text in filter(None, args.variants.split(";")):
        try:
            blocks = mlm_loss.parse_blocks(text)
        except ValueError as e:
            parser.error(str(e))
        variants[text] = loss_and_grads("pallas", blocks)
    for i in range(args.draws):
        seed = int(np.random.SeedSequence().entropy % 2 ** 32)
        inputs = draw(np.random.default_rng(seed), args.rows, args.vocab)
        want = plain(*inputs)
        for text, fused in variants.items():
            seen = check(fused(*inputs), want, f"{text}, draw {i} seed {seed}")
            print(f"draw {i}, {text}: agrees with the XLA composition: {seen} (seed {seed})",
                  flush=True)
    inputs = draw(np.random.default_rng(0), args.rows, args.vocab)
    print(f"\nMLM loss forward + backward, {args.rows} x {args.vocab} bf16 logits, "
          f"{jax.devices()[0].device_kind}:\n| implementation | ms |\n| --- | --- |")
    print(f"| xla | {median_ms(plain, *inputs, reps=20):.3f} |", flush=True)
    for text, fused in variants.items():
        print(f"| pallas {text} | {median_ms(fused, *inputs, reps=20):.3f} |", flush=True)


if __name__ == "__main__":
    main()
