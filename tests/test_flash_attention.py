"""The Pallas flash-attention kernel (run by the Pallas interpreter on CPU) matches a float64
numpy reference: output and all three gradients on many fresh random packed layouts
(documents of 1 token up to the row, trailing padding, all-padding rows, lengths that are
not a multiple of the block), default and small blocks, with and without the mask-free
interior, and on the layouts of issue 14; its block skipping never drops a visible pair;
the cuDNN baseline agrees.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import (assert_close_to_fp32_reference, assert_padding_rows_are_zero,
                             check_issue_14_layouts, check_random_packed_layouts, fresh_rng,
                             output_and_grads, random_inputs, random_packed_layouts, relative_error)
from mosaicbert_jax.attention import (alibi_slopes, attention, available_implementations,
                                      resolve_implementation)
from mosaicbert_jax.attention.block_sparsity import (fully_visible_block_ranges,
                                                    visible_block_pairs, visible_block_ranges)
from mosaicbert_jax.attention.pallas_gpu import BlockSizes, flash_attention
from mosaicbert_jax.attention.reference import segment_mask

# Small blocks, so short test sequences still span many blocks and skip some of them.
SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32,
                          block_q_dq=32, block_k_dq=16)


def _kernel(block_sizes=None):
    """flash_attention in the interpreter with these blocks (None: the defaults for seq)."""
    def run(q, k, v, segment_ids, slopes, scale):
        return flash_attention(q, k, v, segment_ids, slopes, scale, block_sizes=block_sizes,
                               interpret=True)
    return run


# Lengths: below one 64-block, a 64-block multiple, 77/100 (not multiples of any block),
# 160 (the >128 defaults: 128-row blocks); head dims 16 and 64 are the two whose
# scale * log2(e) made the old -1e30 mask overflow under FMA contraction (issue 14);
# 128 gets 8 warps by default.
@pytest.mark.parametrize("seq,heads,head_dim,block_sizes", [
    (40, 2, 16, None),
    (128, 2, 16, None),
    (128, 3, 64, None),
    (160, 2, 16, None),
    (80, 3, 128, None),
    (100, 2, 16, SMALL_BLOCKS),
    (77, 2, 16, dataclasses.replace(SMALL_BLOCKS, unmasked_interior=False)),
    (64, 2, 32, BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=64,
                           block_q_dq=64, block_k_dq=16)),
])
def test_random_packed_layouts_match_float64_reference(seq, heads, head_dim, block_sizes):
    check_random_packed_layouts(_kernel(block_sizes), seq, draws=4, batch=4, heads=heads,
                                head_dim=head_dim, name=f"pallas_interpret {block_sizes}")


@pytest.mark.parametrize("head_dim", [16, 64])
def test_issue_14_layouts_match_float64_reference(head_dim):
    """The rows issue 14 found wrong under JAX 0.10 (third document, tokens 77..101)."""
    check_issue_14_layouts("pallas_interpret", head_dim)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_within_2e_2_of_fp32_reference(dtype):
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 3, 48, 4, 64
    segment_ids = jnp.asarray(random_packed_layouts(rng, batch, seq))
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


@pytest.mark.parametrize("block_rows,block_cols", [(16, 32), (32, 16), (16, 16)])
def test_block_ranges_cover_every_visible_pair_and_skip_the_rest(block_rows, block_cols):
    rng, seed = fresh_rng()
    batch, seq = 16, 128
    segment_ids = random_packed_layouts(rng, batch, seq)
    segment_ids[0] = 1  # one document: every block pair is visible and mask-free
    lo, hi = map(np.asarray, visible_block_ranges(jnp.asarray(segment_ids), block_rows,
                                                  block_cols))
    mask = np.asarray(segment_mask(jnp.asarray(segment_ids)))
    blocks = mask.reshape(batch, seq // block_rows, block_rows, seq // block_cols, block_cols)
    has_visible = blocks.any(axis=(2, 4))
    cols = np.arange(seq // block_cols)
    visited = (cols >= lo[..., None]) & (cols < hi[..., None])
    # Every needed block is visited; where documents are contiguous runs with increasing
    # ids (how rows are packed) the visited blocks are exactly the needed ones.
    assert np.all(visited[has_visible]), f"seed {seed}"
    padding_last = np.where(segment_ids == 0, np.iinfo(np.int32).max, segment_ids)
    increasing = np.all(np.diff(padding_last, axis=1) >= 0, axis=1)
    np.testing.assert_array_equal(visited[increasing], has_visible[increasing],
                                  err_msg=f"seed {seed}")
    pairs = np.asarray(visible_block_pairs(jnp.asarray(segment_ids), block_rows, block_cols))
    assert np.all(pairs[has_visible]), f"seed {seed}"
    np.testing.assert_array_equal(pairs[increasing], has_visible[increasing])
    # Blocks marked mask-free must be entirely visible.
    start, end = map(np.asarray, fully_visible_block_ranges(
        jnp.asarray(segment_ids), block_rows, block_cols, jnp.asarray(hi)))
    unmasked = (cols >= start[..., None]) & (cols < end[..., None])
    assert np.all(blocks.all(axis=(2, 4))[unmasked]), f"seed {seed}"
    assert np.all(visited[unmasked])
    assert np.all(unmasked[0])


def test_packed_short_documents_visit_only_diagonal_blocks():
    segment_ids = jnp.repeat(jnp.arange(1, 9, dtype=jnp.int32), 16)[None]  # 8 docs of 16
    lo, hi = visible_block_ranges(segment_ids, 16, 16)
    np.testing.assert_array_equal(lo[0], np.arange(8))
    np.testing.assert_array_equal(hi[0], np.arange(1, 9))


def test_cudnn_baseline_matches_reference_off_gpu():
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 3, 32, 4, 16
    segment_ids = jnp.asarray(random_packed_layouts(rng, batch, seq))
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
