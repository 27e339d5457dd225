"""The comparisons behind tests/test_fp8_attention.py, shared with benchmarks/
check_fp8_attention.py, which runs them compiled on a GPU at model shapes: the float8 d(qkv)
kernels against the plain backward + quantize pass, and the FP8 QKV + attention op against
fused/fp8_dense.py's op + the attention."""

import jax
import jax.numpy as jnp
import numpy as np

from mosaicbert_jax import fp8
from mosaicbert_jax.attention import alibi_slopes, pallas_gpu
from mosaicbert_jax.fused import fp8_attention, fp8_dense, reference
from attention_cases import random_packed_layouts

E5M2 = fp8.BACKWARD_DTYPE
BF16 = jnp.bfloat16


def bits(x) -> np.ndarray:
    """x's bytes, for exact comparisons of float8 and bf16 arrays (NaN included)."""
    return np.atleast_1d(np.asarray(jax.device_get(x))).view(np.uint8)


def assert_same_bits(got, want, what: str) -> None:
    """Every leaf of two pytrees has the same dtype, shape and bytes."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), what
    for path, a, b in zip(paths, jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (path, what)
        np.testing.assert_array_equal(bits(a), bits(b), f"{path}: {what}")


def kernel_grads(rng, interpret: bool, batch: int, seq: int, heads: int, head_dim: int,
                 window: int):
    """(got, want, clipped): qkv_backward_fp8's ((q, q_t, amax), d_bias) and the plain
    backward's d(qkv) through reference.quantize_fp8, laid out alike, at an inverse scale
    that clips the largest values; clipped: the share of float8 values at fmax."""
    segments = jnp.asarray(random_packed_layouts(rng, batch, seq))
    qkv = jnp.asarray(rng.standard_normal((batch, seq, 3, heads, head_dim)), BF16)
    bias = jnp.asarray(rng.standard_normal((3, heads, head_dim)) * 0.3, BF16)
    slopes = jnp.asarray(alibi_slopes(heads), jnp.float32)
    sizes = pallas_gpu.fp8_grad_block_sizes(seq, head_dim)
    scale = head_dim ** -0.5
    out, lse = pallas_gpu.qkv_forward(qkv, bias, segments, slopes, scale, sizes, interpret,
                                      window)
    d_out = jnp.asarray(rng.standard_normal(out.shape), BF16)
    d_qkv, d_bias = pallas_gpu._backward(qkv, qkv, qkv, segments, slopes, out, lse, d_out,
                                         scale, sizes, interpret, window,
                                         pallas_gpu.QKV_SLOTS, bias)
    inv = jnp.float32(1.5 * fp8.fp8_max(E5M2) / float(jnp.max(jnp.abs(
        d_qkv.astype(jnp.float32)))))
    (q, q_t, amax), got_bias = pallas_gpu.qkv_backward_fp8(
        qkv, bias, segments, slopes, out, lse, d_out, scale, sizes, inv, E5M2, interpret,
        window)
    want_q, want_t, want_amax = reference.quantize_fp8(d_qkv.reshape(batch * seq, -1), inv,
                                                       E5M2)
    got = ((q.reshape(batch * seq, -1), q_t.reshape(-1, batch * seq), amax), got_bias)
    clipped = float(np.mean(np.abs(np.asarray(want_q.astype(jnp.float32)))
                            == fp8.fp8_max(E5M2)))
    return got, ((want_q, want_t, want_amax), d_bias), clipped


def op_outputs_and_grads(rng, impl: str, batch: int, seq: int, heads: int, head_dim: int,
                         window: int):
    """(fused, composition): (output, (dx, dW, d_bias, stats' cotangents)) of
    fp8_attention.qkv_attention and of fp8_dense.dense + flash_attention_qkv, compiled, for
    the same random inputs, layout and stats; impl: "pallas" or "pallas_interpret"."""
    interpret = impl == "pallas_interpret"
    segments = jnp.asarray(random_packed_layouts(rng, batch, seq))
    hidden = heads * head_dim
    x = jnp.asarray(rng.standard_normal((batch, seq, hidden)), BF16)
    w = jnp.asarray(rng.standard_normal((hidden, 3 * hidden)) / np.sqrt(hidden), BF16)
    bias = jnp.asarray(rng.standard_normal(3 * hidden) * 0.1, BF16)
    g = jnp.asarray(rng.standard_normal((batch, seq, hidden)), BF16)
    slopes = jnp.asarray(alibi_slopes(heads), jnp.float32)
    history = jnp.zeros(4)
    # Scales a step or two behind the tensors: some of d(qkv) clips, as in delayed scaling.
    stats = {"input": (jnp.float32(2.0 / 448), history),
             "kernel": (jnp.float32(float(jnp.max(jnp.abs(w.astype(jnp.float32)))) / 448),
                        history),
             "output_grad": (jnp.float32(1e-3 / 57344), history)}

    def fused(x, w, bias, stats):
        return fp8_attention.qkv_attention(
            x, w, bias, stats, segments, slopes, heads=heads, attention_implementation=impl,
            quantize_implementation=impl, window=window, dtype=BF16)

    def composition(x, w, bias, stats):
        y = fp8_dense.dense(x.reshape(batch * seq, hidden), w, stats, impl, BF16)
        qkv = y.reshape(batch, seq, 3, heads, head_dim)
        out = pallas_gpu.flash_attention_qkv(qkv, segments, slopes, head_dim ** -0.5,
                                             interpret=interpret, window=window, bias=bias)
        return out.reshape(batch, seq, hidden)

    def run(fn):
        out, vjp = jax.vjp(fn, x, w, bias, stats)
        return out, vjp(g)
    return jax.jit(lambda: run(fused))(), jax.jit(lambda: run(composition))()
