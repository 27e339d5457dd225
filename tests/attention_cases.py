"""Shared inputs and checks for the attention kernel tests (GPU, TPU and Triton kernels)."""

import jax
import jax.numpy as jnp
import numpy as np


def fresh_rng():
    """A new random generator and its seed (printed on failure to reproduce it)."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


def segment_layout(kind: str, batch: int, seq: int, rng) -> np.ndarray:
    """Segment ids [batch, seq]: 'one' document, 'many' short ones, or 'padded' rows."""
    ids = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        if kind == "one":
            ids[row] = 1
            continue
        end = seq - int(rng.integers(seq // 4, seq // 2)) if kind == "padded" else seq
        pos, doc = 0, 1
        while pos < end:
            length = int(rng.integers(1, max(2, seq // 5)))
            ids[row, pos:min(end, pos + length)] = doc
            pos, doc = pos + length, doc + 1
    return ids


def random_inputs(batch, seq, heads, head_dim, rng, dtype=jnp.float32):
    """q, k, v and an output cotangent, standard normal."""
    shape = (batch, seq, heads, head_dim)
    return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4)]


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


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
