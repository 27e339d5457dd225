"""Flash attention with in-kernel ALiBi and segment masking, in Pallas for TPU (Mosaic TPU).

Computes the same function as `pallas_gpu.py` (and the XLA reference): softmax(q k^T * scale
- slope_h * |i - j|, masked to same-segment non-pad keys) v, with no [heads, seq, seq] bias.
Written in the Pallas TPU style: grid (batch, head block, row block, visited block), the
last axis sequential ("arbitrary") with VMEM scratch accumulators; a per-block plan of which
blocks can hold visible pairs (block_sparsity.py) is scalar-prefetched into SMEM. The index
map of the visited axis walks only the visible range [lo, hi) and then repeats its last
block (Pallas issues no new DMA for a repeated block), and `pl.when` skips the compute there.
Forward and backward (one dK/dV kernel over query blocks, one dQ kernel over key blocks)
are tied together with a custom_vjp. An optional sliding window w > 0 (static; query i
sees key j only when |i - j| <= w) narrows the plan to the band and is masked in the
masked blocks; w = 0 leaves the kernels as they are.

TPU layout rules decide the shapes: kernels see [heads, seq, head_dim] tiles of q, k, v
transposed to [batch, heads, seq, head_dim] (a block's last two dims must be whole or
multiples of (8, 128)); segment ids come lane-broadcast ([batch, seq, 128], a column per
query) and sublane-broadcast ([batch, 8, seq], a row per key); the per-row logsumexp and
delta are stored as rows repeated on 8 sublanes ([batch, heads, 8, seq], whole tiles). So
every block on a sequence axis is a multiple of 128. Several heads share one program
(`heads_per_block`), so short sequences do not pay the per-grid-step overhead once per
head; the ALiBi distance tile is built once per step and shared by those heads.

Verified only in interpret mode on CPU so far (tests/test_tpu_attention.py); see
docs/attention.md for how to benchmark it on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mosaicbert_jax.attention.block_sparsity import (check_window, fully_visible_block_ranges,
                                                    visible_block_ranges, window_block_pairs)

NUM_LANES = 128
NUM_SUBLANES = 8
# Finite, so a fully masked tile gives exp(0) junk that the next real max rescales to 0.
MASK_VALUE = -1e30
# Stored logsumexp of query rows that see no key: exp(anything - this) = 0 in backward.
EMPTY_ROW_LSE = 1e30
# Query-side id of padding; keys keep id 0, so a padding query matches no key at all.
_PAD_QUERY_SEGMENT = int(jnp.iinfo(jnp.int32).min)
# q k^T and friends: contract the last dim of both operands.
_NT = (((1,), (1,)), ((), ()))
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float32)
# Default cap on heads_per_block * block rows: keeps the per-step VMEM a few MiB.
_HEAD_ROWS_PER_STEP = 1536


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Tile sizes of the three kernels (forward, dK/dV, dQ) and heads per program.

    Every block lies on a sequence axis and must be a multiple of 128 (TPU lanes): key
    blocks because they are lane dims of the score tiles, query blocks because the per-row
    statistics are stored as rows. heads_per_block must divide the number of heads.
    """
    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 128
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 128
    heads_per_block: int = 1
    # Visit block pairs inside one document without the per-element mask.
    unmasked_interior: bool = True

    def __post_init__(self):
        for name, size in zip(self.block_names(), self.blocks()):
            if size <= 0 or size % NUM_LANES:
                raise ValueError(f"{name}={size} must be a positive multiple of {NUM_LANES} "
                                 "(TPU lane width)")
        if self.heads_per_block < 1:
            raise ValueError(f"heads_per_block={self.heads_per_block} must be >= 1")

    @staticmethod
    def block_names() -> tuple[str, ...]:
        return ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")

    def blocks(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in self.block_names())

    def sequence_multiple(self) -> int:
        """The sequence is padded to a multiple of this (every block divides it)."""
        return math.lcm(*self.blocks())


def default_block_sizes_for_head_count(seq_len: int, num_heads: int) -> TpuBlockSizes:
    """Block sizes for a sequence length and head count (a starting point, not yet tuned).

    Up to 256 tokens: 128-blocks (a 128-token row is one block). Longer: 256-blocks, so each
    grid step has more MXU work while packed rows still skip blocks. Heads per program: the
    largest divisor of num_heads with heads * block rows <= 1536 (12 heads of 128 tokens).
    """
    block = NUM_LANES if seq_len <= 2 * NUM_LANES else 2 * NUM_LANES
    heads = max(h for h in range(1, num_heads + 1)
                if num_heads % h == 0 and h * block <= max(_HEAD_ROWS_PER_STEP, block))
    return TpuBlockSizes(block, block, block, block, block, block, heads_per_block=heads)


# ----------------------------------------------------------------------------- kernel pieces


def _lanes(x: jax.Array, width: int) -> jax.Array:
    """A lane-replicated [rows, 128] statistic as [rows, width]."""
    if width <= NUM_LANES:
        return x[:, :width]
    return jnp.tile(x, (1, width // NUM_LANES))


def _distance(row_start, col_start, rows: int, cols: int) -> jax.Array:
    """fp32 [rows, cols] tile of |i - j| for rows at row_start and cols at col_start."""
    rel = (lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
           - lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + (row_start - col_start))
    return jnp.abs(rel.astype(jnp.float32))


def _alibi_logits(a, b, scale: float, slope, distance, same) -> jax.Array:
    """fp32 a b^T * scale - slope * |i - j|, set to MASK_VALUE where `same` is False (None:
    an unmasked tile)."""
    s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)
    s = s * scale - slope * distance
    return s if same is None else jnp.where(same, s, MASK_VALUE)


def _same_segment(row_ids_ref, col_ids_ref, cols: int) -> jax.Array:
    """bool [rows, cols] from lane-broadcast row ids [rows, 128] and key-row ids [8, cols]."""
    row_ids = jnp.tile(row_ids_ref[...], (1, cols // NUM_LANES))
    return row_ids == col_ids_ref[:1, :]


def _visible(row_ids_ref, col_ids_ref, cols: int, masked: bool, distance, window: int):
    """The mask of a tile: None when unmasked; else same segment, and |i - j| <= window
    when window > 0."""
    if not masked:
        return None
    same = _same_segment(row_ids_ref, col_ids_ref, cols)
    return same & (distance <= window) if window else same


def _plan_entry(plan_ref, batch, row_block, n_rows: int):
    """lo, hi, start, end of one row block from the flat scalar-prefetched plan."""
    base = batch * 4 * n_rows + row_block
    return tuple(plan_ref[base + k * n_rows] for k in range(4))


def _visited_block(plan_ref, batch, row_block, step, n_rows: int):
    """The block visited at this step: lo + step, held at hi - 1 once the range is done."""
    lo, hi, _, _ = _plan_entry(plan_ref, batch, row_block, n_rows)
    return jnp.minimum(lo + step, jnp.maximum(hi - 1, lo))


def _when_visible(plan_ref, batch, row_block, step, n_rows: int, split: bool, visit) -> None:
    """Runs visit(block, masked) when this step's block lies in [lo, hi)."""
    lo, hi, start, end = _plan_entry(plan_ref, batch, row_block, n_rows)
    block = lo + step
    in_range = block < hi
    if not split:
        pl.when(in_range)(lambda: visit(block, True))
        return
    interior = (start <= block) & (block < end)
    pl.when(in_range & interior)(lambda: visit(block, False))
    pl.when(in_range & jnp.logical_not(interior))(lambda: visit(block, True))


def _for_each_head(heads: int, body) -> None:
    """body(h) for each head slot of the block (a loop, so the kernel stays small)."""
    def step(h, carry):
        body(h)
        return carry
    lax.fori_loop(0, heads, step, 0)


# ----------------------------------------------------------------------------- kernels


def _forward_kernel(plan_ref, slopes_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *,
                    scale: float, n_rows: int, split: bool, window: int):
    batch, head_block, q_block, step = (pl.program_id(a) for a in range(4))
    heads, block_q, head_dim = q_ref.shape
    block_k = k_ref.shape[1]

    @pl.when(step == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    def visit(k_block, masked):
        distance = _distance(q_block * block_q, k_block * block_k, block_q, block_k)
        same = _visible(qseg_ref, kseg_ref, block_k, masked, distance, window)

        def one_head(h):
            slope = slopes_ref[head_block * heads + h]
            s = _alibi_logits(q_ref[h], k_ref[h], scale, slope, distance, same)
            m_prev = m_scratch[h]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.exp(s - _lanes(m_next, block_k))
            alpha = jnp.exp(m_prev - m_next)
            l_scratch[h] = alpha * l_scratch[h] + jnp.sum(p, axis=1, keepdims=True)
            m_scratch[h] = m_next
            v = v_ref[h]
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            acc_scratch[h] = acc_scratch[h] * _lanes(alpha, head_dim) + pv

        _for_each_head(heads, one_head)

    _when_visible(plan_ref, batch, q_block, step, n_rows, split, visit)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        def one_head(h):
            row_sum = l_scratch[h]
            sees_keys = (qseg_ref[...] != _PAD_QUERY_SEGMENT) & (row_sum > 0.0)
            safe_sum = jnp.where(sees_keys, row_sum, 1.0)
            # 1 / row sum, or 0 for rows that see no key (sliced as fp32, not as a mask).
            inverse = _lanes(jnp.where(sees_keys, 1.0 / safe_sum, 0.0), head_dim)
            out = jnp.where(inverse > 0.0, acc_scratch[h] * inverse, 0.0)
            o_ref[h] = out.astype(o_ref.dtype)
            lse = jnp.where(sees_keys, m_scratch[h] + jnp.log(safe_sum), EMPTY_ROW_LSE)
            # Lane-replicated column [rows, 128] -> the same row on 8 sublanes [8, rows].
            lse_ref[h] = jnp.transpose(lse)[:NUM_SUBLANES, :]

        _for_each_head(heads, one_head)


def _dkdv_kernel(plan_ref, slopes_ref, kseg_ref, qseg_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *,
                 scale: float, n_rows: int, split: bool, window: int):
    batch, head_block, k_block, step = (pl.program_id(a) for a in range(4))
    heads, block_k, _ = k_ref.shape
    block_q = q_ref.shape[1]

    @pl.when(step == 0)
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    def visit(q_block, masked):
        # Transposed tiles [block_k, block_q]: dV = P^T dO and dK = dS^T Q need no transposes.
        distance = _distance(k_block * block_k, q_block * block_q, block_k, block_q)
        same = _visible(kseg_ref, qseg_ref, block_q, masked, distance, window)

        def one_head(h):
            slope = slopes_ref[head_block * heads + h]
            q, do = q_ref[h], do_ref[h]
            s_t = _alibi_logits(k_ref[h], q, scale, slope, distance, same)
            p_t = jnp.exp(s_t - lse_ref[h, :1, :])
            dv_scratch[h] += lax.dot_general(p_t.astype(do.dtype), do, (((1,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)
            dp_t = lax.dot_general(v_ref[h], do, _NT, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - delta_ref[h, :1, :])
            dk_scratch[h] += lax.dot_general(ds_t.astype(q.dtype), q, (((1,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        _for_each_head(heads, one_head)

    _when_visible(plan_ref, batch, k_block, step, n_rows, split, visit)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scratch[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _dq_kernel(plan_ref, slopes_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, dq_scratch, *, scale: float, n_rows: int,
               split: bool, window: int):
    batch, head_block, q_block, step = (pl.program_id(a) for a in range(4))
    heads, block_q, _ = q_ref.shape
    block_k = k_ref.shape[1]

    @pl.when(step == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    def visit(k_block, masked):
        distance = _distance(q_block * block_q, k_block * block_k, block_q, block_k)
        same = _visible(qseg_ref, kseg_ref, block_k, masked, distance, window)

        def one_head(h):
            slope = slopes_ref[head_block * heads + h]
            k = k_ref[h]
            s = _alibi_logits(q_ref[h], k, scale, slope, distance, same)
            # Row statistics are stored as rows; the score tile needs them as columns.
            lse = jnp.expand_dims(lse_ref[h, 0], -1)
            delta = jnp.expand_dims(delta_ref[h, 0], -1)
            p = jnp.exp(s - lse)
            dp = lax.dot_general(do_ref[h], v_ref[h], _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - delta)
            dq_scratch[h] += lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        _for_each_head(heads, one_head)

    _when_visible(plan_ref, batch, q_block, step, n_rows, split, visit)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _flat_plan(segment_ids, block_rows: int, block_cols: int, window: int = 0) -> jax.Array:
    """int32 [batch * 4 * n_row_blocks]: lo, hi, start, end per row block (see block_sparsity).

    Flat, so SMEM holds it without padding a small trailing dim up to a tile.
    """
    lo, hi = visible_block_ranges(segment_ids, block_rows, block_cols, window)
    start, end = fully_visible_block_ranges(segment_ids, block_rows, block_cols, hi, window)
    return jnp.stack([lo, hi, start, end], axis=1).reshape(-1)


def _visited_steps(seq: int, block_rows: int, block_cols: int, window: int) -> int:
    """Length of the visited grid axis: every column block, or with a window only the most
    that any row block's band holds (its visible range never exceeds the band)."""
    n_rows, n_cols = seq // block_rows, seq // block_cols
    if not window:
        return n_cols
    in_band, _ = window_block_pairs(n_rows, n_cols, block_rows, block_cols, window)
    return int(in_band.sum(axis=1).max())


@dataclasses.dataclass(frozen=True)
class _Segments:
    """Segment ids in the lane/sublane-broadcast layouts the kernels read."""
    query_columns: jax.Array  # [batch, seq, 128], padding -> sentinel
    query_rows: jax.Array     # [batch, 8, seq], padding -> sentinel
    key_columns: jax.Array    # [batch, seq, 128]
    key_rows: jax.Array       # [batch, 8, seq]

    @classmethod
    def build(cls, segment_ids: jax.Array) -> "_Segments":
        queries = jnp.where(segment_ids == 0, _PAD_QUERY_SEGMENT, segment_ids)
        batch, seq = segment_ids.shape

        def columns(ids):
            return jnp.broadcast_to(ids[:, :, None], (batch, seq, NUM_LANES))

        def rows(ids):
            return jnp.broadcast_to(ids[:, None, :], (batch, NUM_SUBLANES, seq))

        return cls(columns(queries), rows(queries), columns(segment_ids), rows(segment_ids))


def _specs(heads: int, head_dim: int, n_rows: int):
    """BlockSpec builders for grid (batch, head block, row block, step); the visited axis's
    block index comes from the plan (scalar-prefetched, the last index-map argument)."""

    def visited(b, i, j, plan):
        return _visited_block(plan, b, i, j, n_rows)

    def row_tokens(block):
        return pl.BlockSpec((None, heads, block, head_dim), lambda b, h, i, j, plan: (b, h, i, 0))

    def visited_tokens(block):
        return pl.BlockSpec((None, heads, block, head_dim),
                            lambda b, h, i, j, plan: (b, h, visited(b, i, j, plan), 0))

    def row_columns(block):
        return pl.BlockSpec((None, block, NUM_LANES), lambda b, h, i, j, plan: (b, i, 0))

    def visited_rows(block):
        return pl.BlockSpec((None, NUM_SUBLANES, block),
                            lambda b, h, i, j, plan: (b, 0, visited(b, i, j, plan)))

    def row_stats(block):
        return pl.BlockSpec((None, heads, NUM_SUBLANES, block),
                            lambda b, h, i, j, plan: (b, h, 0, i))

    def visited_stats(block):
        return pl.BlockSpec((None, heads, NUM_SUBLANES, block),
                            lambda b, h, i, j, plan: (b, h, 0, visited(b, i, j, plan)))

    slopes = pl.BlockSpec(memory_space=pltpu.SMEM)
    return dict(row_tokens=row_tokens, visited_tokens=visited_tokens, row_columns=row_columns,
                visited_rows=visited_rows, row_stats=row_stats, visited_stats=visited_stats,
                slopes=slopes)


def _compiler_params() -> pltpu.CompilerParams:
    # The step axis carries the scratch accumulators, so it runs in order on one core.
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward(q, k, v, segments: _Segments, segment_ids, slopes, scale,
             sizes: TpuBlockSizes, interpret, window: int = 0):
    batch, num_heads, seq, head_dim = q.shape
    bq, bk, heads = sizes.block_q, sizes.block_k, sizes.heads_per_block
    n_rows = seq // bq
    spec = _specs(heads, head_dim, n_rows)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, num_heads // heads, n_rows, _visited_steps(seq, bq, bk, window)),
        in_specs=[spec["slopes"], spec["row_columns"](bq), spec["visited_rows"](bk),
                  spec["row_tokens"](bq), spec["visited_tokens"](bk),
                  spec["visited_tokens"](bk)],
        out_specs=[spec["row_tokens"](bq), spec["row_stats"](bq)],
        scratch_shapes=[pltpu.VMEM((heads, bq, NUM_LANES), jnp.float32),
                        pltpu.VMEM((heads, bq, NUM_LANES), jnp.float32),
                        pltpu.VMEM((heads, bq, head_dim), jnp.float32)],
    )
    kernel = functools.partial(_forward_kernel, scale=scale, n_rows=n_rows,
                               split=sizes.unmasked_interior, window=window)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, NUM_SUBLANES, seq), jnp.float32)],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="alibi_flash_forward_tpu",
    )(_flat_plan(segment_ids, bq, bk, window), slopes, segments.query_columns,
      segments.key_rows, q, k, v)


def _backward(q, k, v, segments: _Segments, segment_ids, slopes, out, lse, d_out, scale,
              sizes: TpuBlockSizes, interpret, window: int = 0):
    batch, num_heads, seq, head_dim = q.shape
    heads = sizes.heads_per_block
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
    delta = jnp.broadcast_to(delta[:, :, None], lse.shape)

    bq, bk = sizes.block_q_dkv, sizes.block_k_dkv
    n_rows = seq // bk
    spec = _specs(heads, head_dim, n_rows)
    # Key blocks are the rows here: the plan with rows and columns swapped.
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, num_heads // heads, n_rows, _visited_steps(seq, bk, bq, window)),
        in_specs=[spec["slopes"], spec["row_columns"](bk), spec["visited_rows"](bq),
                  spec["visited_tokens"](bq), spec["row_tokens"](bk), spec["row_tokens"](bk),
                  spec["visited_tokens"](bq), spec["visited_stats"](bq),
                  spec["visited_stats"](bq)],
        out_specs=[spec["row_tokens"](bk), spec["row_tokens"](bk)],
        scratch_shapes=[pltpu.VMEM((heads, bk, head_dim), jnp.float32),
                        pltpu.VMEM((heads, bk, head_dim), jnp.float32)],
    )
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, n_rows=n_rows,
                          split=sizes.unmasked_interior, window=window),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="alibi_flash_dkdv_tpu",
    )(_flat_plan(segment_ids, bk, bq, window), slopes, segments.key_columns,
      segments.query_rows,
      q, k, v, d_out, lse, delta)

    bq, bk = sizes.block_q_dq, sizes.block_k_dq
    n_rows = seq // bq
    spec = _specs(heads, head_dim, n_rows)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, num_heads // heads, n_rows, _visited_steps(seq, bq, bk, window)),
        in_specs=[spec["slopes"], spec["row_columns"](bq), spec["visited_rows"](bk),
                  spec["row_tokens"](bq), spec["visited_tokens"](bk),
                  spec["visited_tokens"](bk), spec["row_tokens"](bq), spec["row_stats"](bq),
                  spec["row_stats"](bq)],
        out_specs=spec["row_tokens"](bq),
        scratch_shapes=[pltpu.VMEM((heads, bq, head_dim), jnp.float32)],
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, n_rows=n_rows,
                          split=sizes.unmasked_interior, window=window),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="alibi_flash_dq_tpu",
    )(_flat_plan(segment_ids, bq, bk, window), slopes, segments.query_columns,
      segments.key_rows, q, k, v, d_out, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, segment_ids, slopes, scale, sizes, interpret, window):
    segments = _Segments.build(segment_ids)
    return _forward(q, k, v, segments, segment_ids, slopes, scale, sizes, interpret,
                    window)[0]


def _flash_fwd(q, k, v, segment_ids, slopes, scale, sizes, interpret, window):
    segments = _Segments.build(segment_ids)
    out, lse = _forward(q, k, v, segments, segment_ids, slopes, scale, sizes, interpret,
                        window)
    return out, (q, k, v, segment_ids, slopes, out, lse)


def _flash_bwd(scale, sizes, interpret, window, residuals, d_out):
    q, k, v, segment_ids, slopes, out, lse = residuals
    segments = _Segments.build(segment_ids)
    dq, dk, dv = _backward(q, k, v, segments, segment_ids, slopes, out, lse, d_out, scale,
                           sizes, interpret, window)
    # Segment ids are integers and ALiBi slopes are constants of the model: no cotangent.
    return dq, dk, dv, None, jnp.zeros_like(slopes)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_inputs(q: jax.Array, sizes: TpuBlockSizes) -> None:
    head_dim, num_heads = q.shape[-1], q.shape[2]
    if head_dim > NUM_LANES and head_dim % NUM_LANES:
        raise ValueError(f"head_dim={head_dim} is not supported by the TPU kernel: use at most "
                         f"{NUM_LANES} or a multiple of {NUM_LANES} (64 and 128 are the usual), "
                         "or implementation='xla'")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported by the TPU kernel; use bfloat16 or "
                         "float32")
    if num_heads % sizes.heads_per_block:
        raise ValueError(f"heads_per_block={sizes.heads_per_block} must divide the number of "
                         f"heads ({num_heads})")


def flash_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                        slopes: jax.Array, scale: float, *,
                        block_sizes: Optional[TpuBlockSizes] = None,
                        interpret: Any = False, window: int = 0) -> jax.Array:
    """ALiBi + segment-masked attention on [batch, seq, heads, head_dim]; any seq length.

    segment_ids: [batch, seq] non-negative ints, 0 = padding. The sequence is padded
    internally (segment 0) to a multiple of the blocks and the output sliced back.
    interpret: False on TPU; True (or a `pltpu.InterpretParams`) runs the kernels in the
    Pallas interpreter on any backend. window: static int; > 0 limits query i to keys with
    |i - j| <= window (0: full attention).
    """
    window = check_window(window)
    if not interpret and jax.default_backend() != "tpu":
        raise ValueError(f"the Pallas TPU kernel runs on TPU only (backend is "
                         f"{jax.default_backend()!r}); use implementation='pallas_tpu_interpret' "
                         "to interpret it here, or 'pallas' / 'xla'")
    seq, num_heads = q.shape[1], q.shape[2]
    sizes = block_sizes or default_block_sizes_for_head_count(seq, num_heads)
    _check_inputs(q, sizes)
    multiple = sizes.sequence_multiple()
    padded = -(-seq // multiple) * multiple
    segment_ids = segment_ids.astype(jnp.int32)
    if padded != seq:
        segment_ids = jnp.pad(segment_ids, [(0, 0), (0, padded - seq)])

    def heads_major(x):  # [batch, seq, heads, dim] -> [batch, heads, padded seq, dim]
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, [(0, 0), (0, 0), (0, padded - seq), (0, 0)]) if padded != seq else x

    out = _flash(heads_major(q), heads_major(k), heads_major(v), segment_ids,
                 jnp.asarray(slopes, jnp.float32), float(scale), sizes, interpret, window)
    return jnp.swapaxes(out[:, :, :seq], 1, 2)


def pallas_tpu_attention(q, k, v, segment_ids, slopes, scale, window: int = 0):
    """The compiled TPU kernel (registered as 'pallas_tpu'; 'pallas'/'auto' on TPU)."""
    return flash_attention_tpu(q, k, v, segment_ids, slopes, scale, window=window)


def pallas_tpu_attention_interpret(q, k, v, segment_ids, slopes, scale, window: int = 0):
    """The same kernels run by the Pallas interpreter: any backend, slow (for tests)."""
    return flash_attention_tpu(q, k, v, segment_ids, slopes, scale, interpret=True,
                               window=window)
