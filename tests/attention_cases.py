"""Shared inputs and checks for the attention kernel tests (GPU, TPU and Triton kernels).

The kernels are checked against `float64_attention_and_grads`, plain numpy in float64, on
fresh random packed layouts (`random_packed_layouts`): documents of 1 token up to the whole
row, trailing padding of any length, rows of nothing but padding. Every random draw comes
from a seed that failure messages print, so a failing layout can be replayed.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Acceptance of issue 14 (fp32, interpret mode): relative error per batch row.
FORWARD_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-3

# The layouts of issue 14 that the Pallas GPU kernel got wrong under JAX 0.10 (S = 128):
# documents at [0, 50), [50, 90), [90, 120) then padding; and documents of these lengths.
ISSUE_14_DOCUMENT_LENGTHS = ((50, 40, 30), (1, 3, 2, 40, 1, 30, 5, 20))


def fresh_rng():
    """A new random generator and its seed (printed on failure to reproduce it)."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


def layout_from_lengths(lengths, seq: int) -> np.ndarray:
    """Segment ids [seq]: documents 1, 2, ... of these lengths packed from 0, then padding."""
    ids = np.zeros(seq, np.int32)
    ends = np.cumsum(lengths)
    if ends[-1] > seq:
        raise ValueError(f"documents of {sum(lengths)} tokens do not fit in seq={seq}")
    for doc, (start, end) in enumerate(zip(ends - np.asarray(lengths), ends), start=1):
        ids[start:end] = doc
    return ids


def _random_document_length(rng, room: int) -> int:
    """1 .. room tokens: tiny documents, log-uniform ones, or all that is left, in turn."""
    draw = rng.random()
    if draw < 0.25:
        return int(rng.integers(1, min(room, 4) + 1))
    if draw < 0.8:
        return int(np.clip(np.exp(rng.uniform(0.0, np.log(room + 1))), 1, room))
    return room


def random_packed_row(rng, seq: int) -> np.ndarray:
    """Segment ids [seq] of one packed row: documents of 1..seq tokens at random offsets,
    then trailing padding of random length (none in about a third of the rows)."""
    padding = 0 if rng.random() < 0.35 else int(rng.integers(1, seq))
    end, ids, pos = seq - padding, np.zeros(seq, np.int32), 0
    doc_ids = np.arange(1, seq + 1, dtype=np.int32)
    if rng.random() < 0.25:  # ids need not count up: the kernels only compare them
        doc_ids = rng.permutation(doc_ids) + int(rng.integers(0, 1000))
    for doc in doc_ids:
        if pos >= end:
            break
        length = _random_document_length(rng, end - pos)
        ids[pos:pos + length] = doc
        pos += length
    return ids


def random_packed_layouts(rng, batch: int, seq: int) -> np.ndarray:
    """Segment ids [batch, seq] of random packed rows; from 3 rows up one row, at a random
    index, is all padding."""
    ids = np.stack([random_packed_row(rng, seq) for _ in range(batch)])
    if batch >= 3:
        ids[int(rng.integers(batch))] = 0
    return ids


def random_inputs(batch, seq, heads, head_dim, rng, dtype=jnp.float32):
    """q, k, v and an output cotangent, standard normal."""
    shape = (batch, seq, heads, head_dim)
    return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4)]


def float64_attention_and_grads(q, k, v, d_out, segment_ids, slopes, scale, window=0):
    """Output and dq, dk, dv of sum(out * d_out) in numpy float64, from the definition:
    softmax(q k^T * scale - slope_h |i - j|) over same-segment non-padding keys (and with
    window > 0 only keys with |i - j| <= window), times v; rows that see no key give 0."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    segment_ids = np.asarray(segment_ids)
    pos = np.arange(q.shape[1])
    logits = (np.einsum("bqhd,bkhd->bhqk", q, k) * scale
              - np.asarray(slopes, np.float64)[:, None, None] * np.abs(pos[:, None] - pos))
    visible = ((segment_ids[:, :, None] == segment_ids[:, None, :])
               & (segment_ids[:, None, :] != 0))[:, None]
    if window:
        visible = visible & (np.abs(pos[:, None] - pos[None, :]) <= window)
    logits = np.where(visible, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    probs = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
    total = probs.sum(axis=-1, keepdims=True)
    probs = probs / np.where(total > 0, total, 1.0)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    d_probs = np.einsum("bqhd,bkhd->bhqk", d_out, v)
    d_logits = probs * (d_probs - np.sum(d_probs * probs, axis=-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", d_logits, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", d_logits, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", probs, d_out)
    return out, dq, dk, dv


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def jitted_output_and_grads(fn: Callable) -> Callable:
    """jit of (q, k, v, segment_ids, d_out) -> (out, dq, dk, dv) for fn(q, k, v, segment_ids):
    segment ids are an argument, so one compilation serves every layout of a shape."""
    def run(q, k, v, segment_ids, d_out):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
        return (out, *vjp(d_out))
    return jax.jit(run)


def assert_matches_float64_reference(got, segment_ids, q, k, v, d_out, slopes, scale,
                                     context: str, forward_tolerance=FORWARD_TOLERANCE,
                                     gradient_tolerance=GRADIENT_TOLERANCE, window=0):
    """Output and gradients `got` lie within the tolerances of the float64 reference, row by
    row of the batch (so one wrong document cannot hide among right ones), and are exactly
    zero and finite where the reference is: padding queries and keys, all-padding rows."""
    want = float64_attention_and_grads(q, k, v, d_out, segment_ids, slopes, scale, window)
    padding = ~np.asarray(segment_ids, bool)
    # The largest row of any reference output: the error floor when a whole gradient is zero.
    largest_row = max(float(np.linalg.norm(w.reshape(w.shape[0], -1), axis=1).max())
                      for w in want)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        g = np.asarray(g)
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape} ({context})"
        assert np.all(np.isfinite(g)), f"{name}: not finite ({context})"
        assert np.all(g[padding] == 0.0), f"{name}: nonzero at padding ({context})"
        tolerance = forward_tolerance if name == "out" else gradient_tolerance
        row_norms = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
        # Rows of 1-token documents only have zero dq and dk (softmax over one key): their
        # error is taken relative to 1% of the largest row instead, or, when every row of
        # this gradient is such a row (all its reference is 0), of the largest row of any
        # output (dv of a 1-token document is its dO), so rounding cannot divide by zero.
        floor = 0.01 * (row_norms.max() if row_norms.max() > 0 else largest_row)
        for row in np.flatnonzero(~padding.all(axis=1)):
            err = float(np.linalg.norm(g[row] - w[row]) / max(row_norms[row], floor))
            assert err < tolerance, (f"{name}: relative error {err:.2e} >= {tolerance} in row "
                                     f"{row} ({context}); segment ids "
                                     f"{np.asarray(segment_ids)[row].tolist()}")


def check_issue_14_layouts(implementation: str, head_dim: int) -> None:
    """The rows issue 14 found wrong under JAX 0.10 (the third document; tokens 77..101), run
    through the attention dispatcher, against the float64 reference."""
    from mosaicbert_jax.attention import alibi_slopes, attention
    rng, seed = fresh_rng()
    seq, heads = 128, 2
    segment_ids = np.stack([layout_from_lengths(lengths, seq)
                            for lengths in ISSUE_14_DOCUMENT_LENGTHS])
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    q, k, v, d_out = random_inputs(len(segment_ids), seq, heads, head_dim, rng)
    run = jitted_output_and_grads(
        lambda q, k, v, s: attention(q, k, v, s, slopes, implementation))
    got = run(q, k, v, jnp.asarray(segment_ids), d_out)
    assert_matches_float64_reference(got, segment_ids, q, k, v, d_out, slopes, scale,
                                     f"{implementation}, issue 14 layouts, head_dim {head_dim}, "
                                     f"seed {seed}")


def check_random_packed_layouts(fn: Callable, seq: int, *, draws: int, batch: int = 4,
                                heads: int = 2, head_dim: int = 16, dtype=jnp.float32,
                                seed: Optional[int] = None, name: str = "kernel",
                                forward_tolerance=FORWARD_TOLERANCE,
                                gradient_tolerance=GRADIENT_TOLERANCE, window: int = 0) -> int:
    """Checks fn(q, k, v, segment_ids, slopes, scale) against the float64 reference on `draws`
    batches of fresh random packed layouts of length `seq`; returns the seed it used.

    Also the way to check a compiled kernel on a GPU (looser tolerances for TF32 or bf16):
    check_random_packed_layouts(lambda *a: attention(*a[:5], "pallas"), 512, draws=20, ...).
    window > 0: the reference is sliding-window attention (fn must compute the same).
    """
    from mosaicbert_jax.attention import alibi_slopes
    rng, seed = (np.random.default_rng(seed), seed) if seed is not None else fresh_rng()
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    run = jitted_output_and_grads(lambda q, k, v, s: fn(q, k, v, s, slopes, scale))
    for draw in range(draws):
        segment_ids = random_packed_layouts(rng, batch, seq)
        q, k, v, d_out = random_inputs(batch, seq, heads, head_dim, rng, dtype)
        got = run(q, k, v, jnp.asarray(segment_ids), d_out)
        assert all(x.dtype == dtype for x in got), [x.dtype for x in got]
        assert_matches_float64_reference(
            got, segment_ids, q, k, v, d_out, slopes, scale,
            f"{name}, seq {seq}, window {window}, seed {seed}, draw {draw}", forward_tolerance,
            gradient_tolerance, window)
    return seed


def output_and_grads(fn, q, k, v, d_out):
    """Output and dq, dk, dv of sum(out * d_out); jitted, as the model runs it (and faster
    in the interpreter than op-by-op)."""
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out))
    return jax.jit(run)(q, k, v, d_out)


def assert_close_to_fp32_reference(fn, segment_ids, slopes, scale, q, k, v, d_out, seed,
                                   tolerance=2e-2):
    """fn's output and gradients keep the inputs' dtype and lie within `tolerance` (relative)
    of the XLA reference run on float32 copies of the same inputs."""
    from mosaicbert_jax.attention.reference import xla_attention
    got = output_and_grads(fn, q, k, v, d_out)
    upcast = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    want = output_and_grads(lambda q, k, v: xla_attention(q, k, v, segment_ids, slopes, scale),
                            *upcast)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == q.dtype
        err = relative_error(g, w)
        assert err < tolerance, f"{name}: relative error {err:.2e} (seed {seed})"


def assert_padding_rows_are_zero(results, segment_ids):
    """Output and gradients are finite everywhere and exactly zero at padding positions."""
    for x in results:
        assert np.all(np.isfinite(np.asarray(x)))
    padding = ~np.asarray(segment_ids, bool)
    for x in results:
        assert np.all(np.asarray(x)[padding] == 0.0)
