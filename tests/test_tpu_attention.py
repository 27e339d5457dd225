"""The Pallas TPU flash-attention kernel, run by the Pallas interpreter on CPU, matches a
float64 numpy reference: output and dq, dk, dv on many fresh random packed layouts (documents
of 1 token up to the row, trailing padding, all-padding rows, lengths that are not a
multiple of the block), several head counts, uneven block sizes, with and without the
mask-free interior, and on the layouts of issue 14; rows of padding give zeros and no NaN
(also under the TPU-semantics interpreter, which fills uninitialised memory with NaN);
skipped blocks are never read; 'pallas' means this kernel on TPU. Nothing here has run on a
TPU: see docs/attention.md.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attention_cases import (assert_close_to_fp32_reference, assert_padding_rows_are_zero,
                             check_issue_14_layouts, check_random_packed_layouts, fresh_rng,
                             output_and_grads, random_inputs, random_packed_layouts, relative_error)
from mosaicbert_jax.attention import (alibi_slopes, attention, available_implementations,
                                      resolve_implementation)
from mosaicbert_jax.attention.pallas_tpu import (TpuBlockSizes,
                                                 default_block_sizes_for_head_count,
                                                 flash_attention_tpu)
from mosaicbert_jax.attention.reference import xla_attention


# Blocks of 256 queries x 128 keys forward, 128 x 256 for dK/dV, 256 x 128 for dQ.
UNEVEN = dict(block_q=256, block_k_dkv=256, block_q_dq=256)


def _kernel(sizes):
    def run(q, k, v, segment_ids, slopes, scale):
        return flash_attention_tpu(q, k, v, segment_ids, slopes, scale, block_sizes=sizes,
                                   interpret=True)
    return run


# Blocks are multiples of 128 here, so lengths 100 and 200 are padded inside the kernel and
# 256 / 300 span two or three blocks.
@pytest.mark.parametrize("seq,heads,head_dim,sizes", [
    (100, 2, 64, TpuBlockSizes(heads_per_block=2)),
    (256, 2, 16, TpuBlockSizes(heads_per_block=1)),
    (200, 4, 32, TpuBlockSizes(heads_per_block=2, unmasked_interior=False)),
    (300, 2, 16, TpuBlockSizes(heads_per_block=2, **UNEVEN)),
    (160, 3, 128, TpuBlockSizes(heads_per_block=3)),
])
def test_random_packed_layouts_match_float64_reference(seq, heads, head_dim, sizes):
    check_random_packed_layouts(_kernel(sizes), seq, draws=5, batch=4, heads=heads,
                                head_dim=head_dim, name=f"pallas_tpu_interpret {sizes}")


def test_issue_14_layouts_match_float64_reference():
    check_issue_14_layouts("pallas_tpu_interpret", 64)


def test_bfloat16_within_2e_2_of_fp32_reference_through_dispatcher():
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 3, 128, 4, 64
    segment_ids = jnp.asarray(random_packed_layouts(rng, batch, seq))
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    q, k, v, d_out = random_inputs(batch, seq, heads, head_dim, rng, jnp.bfloat16)
    assert_close_to_fp32_reference(
        lambda q, k, v: attention(q, k, v, segment_ids, slopes, "pallas_tpu_interpret"),
        segment_ids, slopes, scale, q, k, v, d_out, seed)


def test_all_padding_rows_give_zeros_and_no_nan_under_tpu_interpreter():
    rng, _ = fresh_rng()
    batch, seq, heads, head_dim = 2, 160, 2, 16
    segment_ids = np.zeros((batch, seq), np.int32)
    segment_ids[1, :25] = 1  # row 0 is all padding; row 1 ends in padding
    segment_ids = jnp.asarray(segment_ids)
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    q, k, v, d_out = random_inputs(batch, seq, heads, head_dim, rng)
    # The TPU-semantics interpreter fills uninitialised VMEM with NaN and raises on
    # out-of-bounds reads, so a missed scratch initialisation shows up here.
    out, dq, dk, dv = output_and_grads(
        lambda q, k, v: flash_attention_tpu(q, k, v, segment_ids, slopes, scale,
                                            block_sizes=TpuBlockSizes(heads_per_block=2),
                                            interpret=pltpu.InterpretParams()),
        q, k, v, d_out)
    assert_padding_rows_are_zero((out, dq, dk, dv), segment_ids)
    want = xla_attention(q, k, v, segment_ids, slopes, scale)
    assert relative_error(out, want) < 1e-5


def test_blocks_of_other_documents_are_never_read():
    """NaN in a document that starts on a block boundary cannot reach the one before it:
    the kernels never load those blocks for its rows (a loaded NaN would survive the mask
    through p @ v)."""
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 1, 256, 2, 64
    segment_ids = jnp.asarray(np.repeat(np.array([[1, 2]], np.int32), 128, axis=1))
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    q, k, v, d_out = random_inputs(batch, seq, heads, head_dim, rng)
    second = (np.arange(seq) >= 128)[None, :, None, None]
    poisoned = [jnp.where(second, jnp.nan, x) for x in (q, k, v)]
    got = output_and_grads(
        lambda q, k, v: flash_attention_tpu(q, k, v, segment_ids, slopes, scale,
                                            block_sizes=TpuBlockSizes(heads_per_block=2),
                                            interpret=True),
        *poisoned, d_out)
    clean = [jnp.where(second, 0.0, x) for x in (q, k, v)]
    want = output_and_grads(lambda q, k, v: xla_attention(q, k, v, segment_ids, slopes, scale),
                             *clean, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        first_doc = np.asarray(g)[:, :128]
        assert np.all(np.isfinite(first_doc)), f"{name} (seed {seed})"
        assert relative_error(first_doc, np.asarray(w)[:, :128]) < 1e-4, f"{name}"


def test_jit_of_gradient_matches_reference():
    rng, seed = fresh_rng()
    seq, heads, head_dim = 128, 4, 32
    segment_ids = jnp.asarray(random_packed_layouts(rng, 2, seq))
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    q, k, v, _ = random_inputs(2, seq, heads, head_dim, rng)

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))

    got = loss(lambda q, k, v: attention(q, k, v, segment_ids, slopes,
                                         "pallas_tpu_interpret"))(q, k, v)
    want = loss(lambda q, k, v: xla_attention(q, k, v, segment_ids, slopes, scale))(q, k, v)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-4, f"seed {seed}"


def test_block_sizes_must_suit_tpu_tiles():
    with pytest.raises(ValueError, match="block_k=64 must be a positive multiple of 128"):
        TpuBlockSizes(block_k=64)
    x = jnp.zeros((1, 128, 6, 64), jnp.float32)
    with pytest.raises(ValueError, match="heads_per_block=4 must divide"):
        flash_attention_tpu(x, x, x, jnp.ones((1, 128), jnp.int32), jnp.ones(6), 0.1,
                            block_sizes=TpuBlockSizes(heads_per_block=4), interpret=True)
    y = jnp.zeros((1, 128, 2, 192), jnp.float32)
    with pytest.raises(ValueError, match="head_dim=192"):
        flash_attention_tpu(y, y, y, jnp.ones((1, 128), jnp.int32), jnp.ones(2), 0.1,
                            interpret=True)
    with pytest.raises(ValueError, match="float16"):
        z = jnp.zeros((1, 128, 2, 64), jnp.float16)
        flash_attention_tpu(z, z, z, jnp.ones((1, 128), jnp.int32), jnp.ones(2), 0.1,
                            interpret=True)


@pytest.mark.parametrize("seq,heads,block,heads_per_block", [
    (128, 12, 128, 12), (100, 16, 128, 8), (512, 12, 256, 6), (2048, 16, 256, 4)])
def test_default_block_sizes(seq, heads, block, heads_per_block):
    sizes = default_block_sizes_for_head_count(seq, heads)
    assert set(sizes.blocks()) == {block}
    assert sizes.heads_per_block == heads_per_block


def test_compiled_kernel_off_tpu_is_a_clear_error():
    x = jnp.zeros((1, 128, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="pallas_tpu_interpret"):
        attention(x, x, x, jnp.ones((1, 128), jnp.int32), jnp.ones(2), "pallas_tpu")


def test_pallas_means_the_tpu_kernel_on_tpu():
    assert {"pallas_tpu", "pallas_tpu_interpret", "triton"} <= set(available_implementations())
    assert resolve_implementation("pallas", backend="tpu") == "pallas_tpu"
    assert resolve_implementation("auto", backend="tpu") == "pallas_tpu"
    assert resolve_implementation("pallas", backend="gpu") == "pallas"
    assert resolve_implementation("pallas", backend="cpu") == "pallas"
    assert resolve_implementation("pallas_tpu", backend="gpu") == "pallas_tpu"
