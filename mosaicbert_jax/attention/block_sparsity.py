"""Which blocks of a segment-masked attention matrix can hold visible (query, key) pairs.

A block pair can be skipped when the nonzero segment ids of its query rows and of its key
columns cannot meet: their [min, max] ranges do not overlap, or either side is all padding.
For each block along one axis we return the half-open range [lo, hi) of blocks along the
other axis that a kernel must visit; everything outside it is fully masked. The test is
conservative (exact for packed rows, whose documents are contiguous runs), so the kernels
still mask every element they visit and stay correct for any segment layout.

With a sliding window w > 0 (query i sees key j only when |i - j| <= w) the same ranges
are intersected with the band of block pairs that hold some pair within w, and a block pair
needs no mask only when every pair in it is within w as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


def block_segment_bounds(segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """[batch, seq // block] min and max nonzero segment id per block (empty: max < min)."""
    batch, seq = segment_ids.shape
    if seq % block:
        raise ValueError(f"seq={seq} must be a multiple of block={block}; pad it first")
    blocks = segment_ids.reshape(batch, seq // block, block)
    real = blocks != 0
    low = jnp.min(jnp.where(real, blocks, _INT_MAX), axis=-1)
    high = jnp.max(jnp.where(real, blocks, _INT_MIN), axis=-1)
    return low, high


def visible_block_pairs(segment_ids: jax.Array, block_rows: int, block_cols: int) -> jax.Array:
    """[batch, n_row_blocks, n_col_blocks] bool: True where a block pair may hold a visible pair."""
    row_low, row_high = block_segment_bounds(segment_ids, block_rows)
    col_low, col_high = block_segment_bounds(segment_ids, block_cols)
    return ((row_low[:, :, None] <= col_high[:, None, :])
            & (col_low[:, None, :] <= row_high[:, :, None]))


def block_distance_bounds(n_rows: int, n_cols: int, block_rows: int,
                          block_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """int [n_row_blocks, n_col_blocks] smallest and largest |i - j| over a block pair."""
    row_first = np.arange(n_rows)[:, None] * block_rows
    row_last = row_first + block_rows - 1
    col_first = np.arange(n_cols)[None, :] * block_cols
    col_last = col_first + block_cols - 1
    nearest = np.maximum(0, np.maximum(col_first - row_last, row_first - col_last))
    farthest = np.maximum(np.abs(row_last - col_first), np.abs(col_last - row_first))
    return nearest, farthest


def window_block_pairs(n_rows: int, n_cols: int, block_rows: int, block_cols: int,
                       window: int) -> tuple[np.ndarray, np.ndarray]:
    """bool [n_row_blocks, n_col_blocks]: some pair within the window / every pair within it.

    Static (numpy): it depends only on shapes and the window, not on the data.
    """
    nearest, farthest = block_distance_bounds(n_rows, n_cols, block_rows, block_cols)
    return nearest <= window, farthest <= window


def check_window(window: int) -> int:
    """The window as a static non-negative Python int (0 = full attention)."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window={window!r} must be a non-negative Python int (0 = full "
                         "attention); it is static, so pass it from the config, not as an array")
    return int(window)


def check_qkv_bias(bias, heads: int, head_dim: int) -> None:
    """Raises a one-line ValueError unless bias holds 3 x heads x head_dim values (the
    fused QKV projection's bias, for attention_qkv and flash_attention_qkv alike)."""
    if np.size(bias) != 3 * heads * head_dim:
        raise ValueError(f"qkv bias of shape {np.shape(bias)} does not match qkv's "
                         f"3 x {heads} heads x {head_dim}")


def visible_block_ranges(segment_ids: jax.Array, block_rows: int, block_cols: int,
                         window: int = 0) -> tuple[jax.Array, jax.Array]:
    """int32 [batch, n_row_blocks] lo and hi: column blocks [lo, hi) cover every visible pair.

    Row blocks with nothing visible (all padding) get lo = hi = 0, so their loop is empty.
    window > 0 also drops the column blocks with no pair within |i - j| <= window.
    """
    live = visible_block_pairs(segment_ids, block_rows, block_cols)
    if check_window(window):
        in_band, _ = window_block_pairs(live.shape[1], live.shape[2], block_rows, block_cols,
                                        window)
        live = live & in_band[None]
    n_cols = live.shape[-1]
    any_live = jnp.any(live, axis=-1)
    lo = jnp.argmax(live, axis=-1)
    hi = n_cols - jnp.argmax(live[..., ::-1], axis=-1)
    lo = jnp.where(any_live, lo, 0).astype(jnp.int32)
    hi = jnp.where(any_live, hi, 0).astype(jnp.int32)
    return lo, hi


def fully_visible_block_ranges(segment_ids: jax.Array, block_rows: int, block_cols: int,
                               hi: jax.Array, window: int = 0) -> tuple[jax.Array, jax.Array]:
    """int32 [batch, n_row_blocks] start and end of a run of column blocks that need no mask.

    A block pair needs no mask when both blocks hold one and the same document and no
    padding. Returns the first such run of column blocks (empty, at `hi`, when there is none),
    so a kernel can visit [lo, start) masked, [start, end) unmasked and [end, hi) masked.
    window > 0: the pair must also lie wholly inside the band |i - j| <= window.
    """
    batch, seq = segment_ids.shape

    def single_document(block):
        blocks = segment_ids.reshape(batch, seq // block, block)
        pure = jnp.all(blocks == blocks[..., :1], axis=-1) & (blocks[..., 0] != 0)
        return pure, blocks[..., 0]

    row_pure, row_doc = single_document(block_rows)
    col_pure, col_doc = single_document(block_cols)
    full = (row_pure[:, :, None] & col_pure[:, None, :]
            & (row_doc[:, :, None] == col_doc[:, None, :]))
    if check_window(window):
        _, inside_band = window_block_pairs(full.shape[1], full.shape[2], block_rows,
                                            block_cols, window)
        full = full & inside_band[None]
    n_cols = full.shape[-1]
    cols = jnp.arange(n_cols)
    any_full = jnp.any(full, axis=-1)
    start = jnp.argmax(full, axis=-1)
    after_run = (~full) & (cols > start[..., None])
    end = jnp.where(jnp.any(after_run, axis=-1), jnp.argmax(after_run, axis=-1), n_cols)
    start = jnp.where(any_full, start, hi).astype(jnp.int32)
    end = jnp.where(any_full, end, hi).astype(jnp.int32)
    return start, end


def pad_sequence(tensors: tuple, segment_ids, multiple: int) -> tuple[tuple, jax.Array]:
    """Pads token tensors ([batch, seq, ...], any rank: q, k, v or one fused qkv) and the
    segment ids (with 0 = padding) along seq to a multiple of `multiple`, so every block is
    full; padded keys are never visible. Returns (tensors, segment_ids)."""
    seq = tensors[0].shape[1]
    padded = -(-seq // multiple) * multiple
    segment_ids = segment_ids.astype(jnp.int32)
    if padded != seq:
        tensors = tuple(jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2))
                        for x in tensors)
        segment_ids = jnp.pad(segment_ids, [(0, 0), (0, padded - seq)])
    return tensors, segment_ids
