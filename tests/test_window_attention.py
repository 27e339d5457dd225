"""Sliding-window attention (issue 19): |i - j| <= w within each document, in every kernel.

The Pallas GPU and TPU kernels (interpret mode) and the XLA reference are checked against
the float64 definition on fresh random packed layouts, forward and gradients; the block
plan must never visit a key block outside the band; the model passes the per-layer window.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import (check_random_packed_layouts, fresh_rng, layout_from_lengths,
                             random_packed_layouts)
from mosaicbert_jax import MosaicBertConfig, MosaicBertModel, attention
from mosaicbert_jax.attention import register_implementation, window_implementations
from mosaicbert_jax.attention.block_sparsity import (fully_visible_block_ranges,
                                                    visible_block_ranges)
from mosaicbert_jax.attention.cudnn import cudnn_attention
from mosaicbert_jax.attention.pallas_gpu import BlockSizes, flash_attention
from mosaicbert_jax.attention.pallas_tpu import TpuBlockSizes, flash_attention_tpu
from mosaicbert_jax.attention.reference import xla_attention
from mosaicbert_jax.model import layer_attention_window

# Not a multiple of any block: the kernels pad to 112 (16-blocks) or 128 (64-blocks).
SEQ = 100
SMALL_BLOCKS = BlockSizes(16, 16, 16, 16, 16, 16)


@pytest.mark.parametrize("window", [1, 7, 16, 33, SEQ])
def test_pallas_gpu_window_matches_float64(window):
    """16-token blocks, so small windows skip most key blocks and cut through the rest."""
    check_random_packed_layouts(
        lambda q, k, v, s, slopes, scale: flash_attention(
            q, k, v, s, slopes, scale, block_sizes=SMALL_BLOCKS, interpret=True,
            window=window),
        SEQ, draws=2, window=window, name="pallas_interpret 16-blocks")


@pytest.mark.parametrize("window", [7, 33])
def test_pallas_gpu_window_default_blocks_through_dispatcher(window):
    """The registered implementation with its default (64/32) blocks and no unmasked split."""
    check_random_packed_layouts(
        lambda q, k, v, s, slopes, scale: attention(q, k, v, s, slopes, "pallas_interpret",
                                                    window=window),
        SEQ, draws=1, window=window, name="pallas_interpret default blocks")
    sizes = dataclasses.replace(SMALL_BLOCKS, unmasked_interior=False)
    check_random_packed_layouts(
        lambda q, k, v, s, slopes, scale: flash_attention(
            q, k, v, s, slopes, scale, block_sizes=sizes, interpret=True, window=window),
        SEQ, draws=1, window=window, name="pallas_interpret, every block masked")


@pytest.mark.parametrize("window", [1, 33, 130, 300])
def test_pallas_tpu_window_matches_float64(window):
    """300 tokens in 128-blocks (padded to 384): windows inside one block and across two."""
    check_random_packed_layouts(
        lambda q, k, v, s, slopes, scale: flash_attention_tpu(
            q, k, v, s, slopes, scale, block_sizes=TpuBlockSizes(), interpret=True,
            window=window),
        300, draws=1, batch=3, window=window, name="pallas_tpu_interpret")


def test_pallas_tpu_window_shrinks_the_visited_grid_axis():
    """600 tokens in 128-blocks (5 per row): window 5 needs only 3 visited steps per row."""
    from mosaicbert_jax.attention.pallas_tpu import _visited_steps
    assert _visited_steps(640, 128, 128, 5) == 3 and _visited_steps(640, 128, 128, 0) == 5
    check_random_packed_layouts(
        lambda q, k, v, s, slopes, scale: flash_attention_tpu(
            q, k, v, s, slopes, scale, block_sizes=TpuBlockSizes(), interpret=True, window=5),
        600, draws=1, batch=2, window=5, name="pallas_tpu_interpret")


@pytest.mark.parametrize("window", [1, 7, 16, 33, SEQ])
def test_xla_reference_and_cudnn_bias_window_match_float64(window):
    check_random_packed_layouts(lambda *args: xla_attention(*args, window=window), SEQ,
                                draws=3, window=window, name="xla")
    check_random_packed_layouts(lambda *args: cudnn_attention(*args, window=window), SEQ,
                                draws=1, window=window, name="cudnn (XLA path off GPU)")


def _element_visibility(segment_ids, window):
    """[batch, seq, seq] numpy truth: same document, key not padding, |i - j| <= window."""
    pos = np.arange(segment_ids.shape[1])
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    return same & (np.abs(pos[:, None] - pos[None, :]) <= window)


@pytest.mark.parametrize("block_rows,block_cols", [(16, 16), (32, 16), (16, 64)])
def test_block_plan_covers_every_visible_pair_and_stays_in_the_band(block_rows, block_cols):
    rng, seed = fresh_rng()
    seq = 256
    for window in (1, 5, 16, 40, 100):
        ids = random_packed_layouts(rng, 4, seq)
        lo, hi = (np.asarray(x) for x in
                  visible_block_ranges(jnp.asarray(ids), block_rows, block_cols, window))
        start, end = (np.asarray(x) for x in fully_visible_block_ranges(
            jnp.asarray(ids), block_rows, block_cols, jnp.asarray(hi), window))
        visible = _element_visibility(ids, window)
        n_rows, n_cols = seq // block_rows, seq // block_cols
        pairs = visible.reshape(4, n_rows, block_rows, n_cols, block_cols)
        any_pair, all_pairs = pairs.any(axis=(2, 4)), pairs.all(axis=(2, 4))
        context = f"window {window}, blocks {block_rows}x{block_cols}, seed {seed}"
        for b in range(4):
            for r in range(n_rows):
                needed = np.flatnonzero(any_pair[b, r])
                if needed.size:
                    assert lo[b, r] <= needed[0] and needed[-1] < hi[b, r], context
                # Every visited block lies in the band: some pair of it is within the window.
                for c in range(lo[b, r], hi[b, r]):
                    nearest = max(0, c * block_cols - (r + 1) * block_rows + 1,
                                  r * block_rows - (c + 1) * block_cols + 1)
                    assert nearest <= window, f"block ({r}, {c}) outside the band ({context})"
                # Blocks run without the mask must be visible in every element.
                assert all_pairs[b, r, start[b, r]:end[b, r]].all(), context


def test_block_plan_counts_only_the_band_of_one_long_document():
    """One 1024-token document in 64-blocks: full attention visits 16 x 16 = 256 block pairs.
    Block c = r + d holds distances 64|d| - 63 .. 64|d| + 63, so window w visits the blocks
    with 64|d| - 63 <= w and runs unmasked those with 64|d| + 63 <= w."""
    ids = jnp.asarray(layout_from_lengths([1024], 1024))[None]

    def visited(window):
        lo, hi = visible_block_ranges(ids, 64, 64, window)
        start, end = fully_visible_block_ranges(ids, 64, 64, hi, window)
        return int(jnp.sum(hi - lo)), int(jnp.sum(end - start))

    diagonal, neighbours, next_neighbours = 16, 2 * 15, 2 * 14
    assert visited(0) == (256, 256)
    assert visited(1) == (diagonal + neighbours, 0)
    assert visited(64) == (diagonal + neighbours, diagonal)
    assert visited(65) == (diagonal + neighbours + next_neighbours, diagonal)
    assert visited(127) == (diagonal + neighbours + next_neighbours, diagonal + neighbours)


def _tiny(**overrides):
    return MosaicBertConfig.tiny(vocab_size=128, attention_implementation="xla",
                                 hidden_dropout_prob=0.0, **overrides)


def _hidden_states(cfg, params, ids, segment_ids):
    return MosaicBertModel(cfg).apply({"params": params}, ids, segment_ids)


def test_model_window_covering_the_row_is_full_attention_and_a_small_one_is_not():
    rng, seed = fresh_rng()
    seq = 48
    ids = jnp.asarray(rng.integers(1, 128, (2, seq)), jnp.int32)
    segment_ids = jnp.asarray(layout_from_lengths([30, 10], seq)[None].repeat(2, axis=0))
    full = _tiny()
    params = MosaicBertModel(full).init(jax.random.key(0), ids, segment_ids)["params"]
    windowed_params = MosaicBertModel(_tiny(attention_window=3)).init(
        jax.random.key(0), ids, segment_ids)["params"]
    # Same parameter names and values: the window adds no parameters.
    assert (jax.tree_util.tree_structure(params)
            == jax.tree_util.tree_structure(windowed_params))
    reference = np.asarray(_hidden_states(full, params, ids, segment_ids))
    wide = np.asarray(_hidden_states(_tiny(attention_window=seq), params, ids, segment_ids))
    np.testing.assert_allclose(wide, reference, rtol=1e-5, atol=1e-5,
                               err_msg=f"seed {seed}")
    narrow = np.asarray(_hidden_states(_tiny(attention_window=3), params, ids, segment_ids))
    change = np.linalg.norm(narrow - reference) / np.linalg.norm(reference)
    assert change > 1e-2, f"window 3 changed the output by only {change:.1e} (seed {seed})"
    # Every layer global again: exactly full attention.
    all_global = _tiny(attention_window=3, global_attention_every=1)
    np.testing.assert_array_equal(
        np.asarray(_hidden_states(all_global, params, ids, segment_ids)), reference)


def test_global_layers_follow_modernbert_rule():
    cfg = _tiny(num_hidden_layers=7, attention_window=64, global_attention_every=3)
    assert [layer_attention_window(cfg, i) for i in range(7)] == [0, 64, 64, 0, 64, 64, 0]
    every_layer = _tiny(num_hidden_layers=3, attention_window=64)
    assert [layer_attention_window(every_layer, i) for i in range(3)] == [64, 64, 64]


@pytest.mark.parametrize("field,value", [("attention_window", -1),
                                         ("attention_window", 2.5),
                                         ("global_attention_every", -3)])
def test_config_rejects_bad_window_settings(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        _tiny(**{field: value})


def test_dispatcher_window_support():
    rng, _ = fresh_rng()
    q, k, v = (jnp.asarray(rng.standard_normal((1, 8, 2, 16)), jnp.float32) for _ in range(3))
    segment_ids = jnp.ones((1, 8), jnp.int32)
    slopes = jnp.ones((2,), jnp.float32)

    def no_window(q, k, v, segment_ids, slopes, scale):
        return xla_attention(q, k, v, segment_ids, slopes, scale)

    register_implementation("test_no_window", no_window)
    np.testing.assert_array_equal(attention(q, k, v, segment_ids, slopes, "test_no_window"),
                                  attention(q, k, v, segment_ids, slopes, "xla"))
    with pytest.raises(ValueError, match="'test_no_window' has no sliding window"):
        attention(q, k, v, segment_ids, slopes, "test_no_window", window=2)
    with pytest.raises(ValueError, match="'triton' has no sliding window"):
        attention(q, k, v, segment_ids, slopes, "triton", window=2)
    with pytest.raises(ValueError, match="window=-1"):
        attention(q, k, v, segment_ids, slopes, "xla", window=-1)
    assert {"pallas", "pallas_tpu", "xla", "cudnn"} <= set(window_implementations())
    assert "triton" not in window_implementations()


def test_a_windowed_model_is_not_exported_to_the_torch_format(tmp_path):
    from mosaicbert_jax import MosaicBertForMaskedLM
    from mosaicbert_jax.convert import export_torch_folder
    cfg = MosaicBertConfig.tiny(vocab_size=64, attention_window=8)
    ids = jnp.ones((1, 8), jnp.int32)
    params = MosaicBertForMaskedLM(cfg).init(jax.random.key(0), ids, ids)["params"]
    with pytest.raises(ValueError, match="sliding window"):
        export_torch_folder(tmp_path / "out", params, cfg)
    assert not (tmp_path / "out").exists()
