"""The Pallas flash-attention kernel (run by the Pallas interpreter on CPU) matches the XLA
reference: output and all three gradients, for several segment layouts, head counts and
sequence lengths; its block skipping never drops a visible pair; the cuDNN baseline agrees.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import (assert_close_to_fp32_reference, assert_padding_rows_are_zero,
                             fresh_rng, output_and_grads, random_inputs, relative_error,
                             segment_layout)
from mosaicbert_jax.attention import (alibi_slopes, attention, available_implementations,
                                      resolve_implementation)
from mosaicbert_jax.attention.block_sparsity import (fully_visible_block_ranges,
                                                    visible_block_pairs, visible_block_ranges)
from mosaicbert_jax.attention.pallas_gpu import BlockSizes, flash_attention
from mosaicbert_jax.attention.reference import segment_mask, xla_attention

# Small blocks, so short test sequences still span many blocks and skip some of them.
SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32,
                          block_q_dq=32, block_k_dq=16)


@pytest.mark.parametrize("layout,batch,seq,heads,head_dim,unmasked_interior", [
    ("one", 1, 64, 12, 64, True),
    ("many", 2, 96, 16, 64, True),
    ("padded", 2, 80, 6, 128, True),
    ("padded", 2, 48, 12, 64, False),
])
def test_forward_and_gradients_match_reference_fp32(layout, batch, seq, heads, head_dim,
                                                    unmasked_interior):
    rng, seed = fresh_rng()
    segment_ids = jnp.asarray(segment_layout(layout, batch, seq, rng))
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    q, k, v, d_out = random_inputs(batch, seq, heads, head_dim, rng)

    sizes = dataclasses.replace(SMALL_BLOCKS, unmasked_interior=unmasked_interior)

    def kernel(q, k, v):
        return flash_attention(q, k, v, segment_ids, slopes, scale, block_sizes=sizes,
                               interpret=True)

    got = output_and_grads(kernel, q, k, v, d_out)
    want = output_and_grads(lambda q, k, v: xla_attention(q, k, v, segment_ids, slopes, scale),
                             q, k, v, d_out)
    for name, g, w, tol in zip(("out", "dq", "dk", "dv"), got, want, (1e-5, 1e-4, 1e-4, 1e-4)):
        assert g.shape == w.shape and g.dtype == w.dtype
        err = relative_error(g, w)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol} (seed {seed})"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_within_2e_2_of_fp32_reference(dtype):
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 2, 48, 12, 64
    segment_ids = jnp.asarray(segment_layout("padded", batch, seq, rng))
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    q, k, v, d_out = random_inputs(batch, seq, heads, head_dim, rng, dtype)
    assert_close_to_fp32_reference(
        lambda q, k, v: attention(q, k, v, segment_ids, slopes, "pallas_interpret"),
        segment_ids, slopes, scale, q, k, v, d_out, seed)


def test_all_padding_rows_give_zeros_and_no_nan():
    rng, _ = fresh_rng()
    batch, seq, heads, head_dim = 2, 40, 3, 16
    segment_ids = np.zeros((batch, seq), np.int32)
    segment_ids[1, :25] = 1  # row 0 is all padding; row 1 ends in padding
    segment_ids = jnp.asarray(segment_ids)
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    q, k, v, d_out = random_inputs(batch, seq, heads, head_dim, rng)
    out, dq, dk, dv = output_and_grads(
        lambda q, k, v: flash_attention(q, k, v, segment_ids, slopes, scale,
                                        block_sizes=SMALL_BLOCKS, interpret=True),
        q, k, v, d_out)
    assert_padding_rows_are_zero((out, dq, dk, dv), segment_ids)


@pytest.mark.parametrize("layout", ["one", "many", "padded"])
def test_block_ranges_cover_every_visible_pair_and_skip_the_rest(layout):
    rng, seed = fresh_rng()
    batch, seq, block_rows, block_cols = 3, 128, 16, 32
    segment_ids = segment_layout(layout, batch, seq, rng)
    lo, hi = map(np.asarray, visible_block_ranges(jnp.asarray(segment_ids), block_rows,
                                                  block_cols))
    mask = np.asarray(segment_mask(jnp.asarray(segment_ids)))
    blocks = mask.reshape(batch, seq // block_rows, block_rows, seq // block_cols, block_cols)
    has_visible = blocks.any(axis=(2, 4))
    cols = np.arange(seq // block_cols)
    visited = (cols >= lo[..., None]) & (cols < hi[..., None])
    # Documents are contiguous runs here, so the visited blocks are exactly the needed ones.
    np.testing.assert_array_equal(visited, has_visible, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(visible_block_pairs(
        jnp.asarray(segment_ids), block_rows, block_cols)), has_visible)
    # Blocks marked mask-free must be entirely visible.
    start, end = map(np.asarray, fully_visible_block_ranges(
        jnp.asarray(segment_ids), block_rows, block_cols, jnp.asarray(hi)))
    unmasked = (cols >= start[..., None]) & (cols < end[..., None])
    assert np.all(blocks.all(axis=(2, 4))[unmasked]), f"seed {seed}"
    assert np.all(visited[unmasked])
    if layout == "one":
        assert np.all(unmasked)


def test_packed_short_documents_visit_only_diagonal_blocks():
    segment_ids = jnp.repeat(jnp.arange(1, 9, dtype=jnp.int32), 16)[None]  # 8 docs of 16
    lo, hi = visible_block_ranges(segment_ids, 16, 16)
    np.testing.assert_array_equal(lo[0], np.arange(8))
    np.testing.assert_array_equal(hi[0], np.arange(1, 9))


def test_cudnn_baseline_matches_reference_off_gpu():
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 2, 32, 4, 16
    segment_ids = jnp.asarray(segment_layout("padded", batch, seq, rng))
    slopes = jnp.asarray(alibi_slopes(heads))
    q, k, v, d_out = random_inputs(batch, seq, heads, head_dim, rng)
    got = output_and_grads(lambda q, k, v: attention(q, k, v, segment_ids, slopes, "cudnn"),
                            q, k, v, d_out)
    want = output_and_grads(lambda q, k, v: attention(q, k, v, segment_ids, slopes, "xla"),
                             q, k, v, d_out)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-5, f"seed {seed}"


def test_unsupported_head_dim_is_a_clear_error():
    x = jnp.zeros((1, 16, 2, 48), jnp.float32)
    with pytest.raises(ValueError, match="head_dim=48"):
        flash_attention(x, x, x, jnp.ones((1, 16), jnp.int32), jnp.ones(2), 0.1, interpret=True)


def test_auto_picks_pallas_on_gpu_and_xla_on_cpu():
    assert {"xla", "cudnn", "pallas", "pallas_interpret", "auto"} <= set(
        available_implementations())
    assert resolve_implementation("auto", backend="gpu") == "pallas"
    assert resolve_implementation("auto", backend="cpu") == "xla"
