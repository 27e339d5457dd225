"""The ALiBi flash-attention kernels in the Triton language (for the jax-triton path).

The same algorithm as `pallas_gpu.py`, written directly in Triton so it can be called
through `jax_triton.triton_call` (see triton_kernels.py, which owns the launch settings and
the custom_vjp). Importing this module needs `triton`; nothing else here touches JAX.

Layouts: q, k, v, dO and the gradients are [batch, seq, heads, head_dim] (contiguous,
seq a multiple of every block); query/key segment ids [batch, seq] int32 (padding queries
carry PAD_QUERY_SEGMENT so they match no key); slopes [heads] fp32; the block plan
[batch, 4, n_row_blocks] int32 (lo, hi, start, end: see block_sparsity.py); logsumexp and
delta [batch, heads, seq] fp32. Softmax runs in log2 units with scale * log2(e) folded in.
Grids are (row block, batch, head).
"""

import triton
import triton.language as tl

LOG2_E = tl.constexpr(1.4426950408889634)
# Finite, so a fully masked tile gives exp2(0) junk that the next real max rescales to 0.
MASK_VALUE = tl.constexpr(-1e30)
# Stored logsumexp of query rows that see no key: exp2(anything - this) = 0 in backward.
EMPTY_ROW_LSE = tl.constexpr(1e30)
PAD_QUERY_SEGMENT = tl.constexpr(-2147483648)


@triton.jit
def _tile(PTR, base, rows, ROW_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Loads the [len(rows), HEAD_DIM] tile of one (batch, head) at sequence rows."""
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(PTR + base + rows[:, None] * ROW_STRIDE + dims[None, :])


@triton.jit
def _store_tile(PTR, base, rows, value, ROW_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    tl.store(PTR + base + rows[:, None] * ROW_STRIDE + dims[None, :],
             value.to(PTR.dtype.element_ty))


@triton.jit
def _plan(PLAN, batch, row_block, N_ROWS: tl.constexpr):
    """lo, hi, start, end of one row block (column blocks to visit / to visit unmasked)."""
    base = batch * 4 * N_ROWS + row_block
    return (tl.load(PLAN + base), tl.load(PLAN + base + N_ROWS),
            tl.load(PLAN + base + 2 * N_ROWS), tl.load(PLAN + base + 3 * N_ROWS))


@triton.jit
def _alibi_scores(a, b, a_pos, b_pos, slope_over_scale, a_seg, b_seg, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
    """a b^T - (slope / scale) |i - j| in fp32, masked to equal segment ids when MASKED."""
    s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    s = s - slope_over_scale * tl.abs(a_pos[:, None] - b_pos[None, :])
    if MASKED:
        s = tl.where(a_seg[:, None] == b_seg[None, :], s, MASK_VALUE)
    return s


@triton.jit
def _forward_blocks(acc, row_max, row_sum, q, q_pos, q_seg, K, V, KSEG, base, seg_base,
                    first, last, slope_over_scale, log2_scale, ROW_STRIDE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, MASKED: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Online softmax over key blocks [first, last)."""
    for k_block in range(first, last):
        keys = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        k = _tile(K, base, keys, ROW_STRIDE, HEAD_DIM)
        k_seg = tl.load(KSEG + seg_base + keys)
        s = _alibi_scores(q, k, q_pos, keys.to(tl.float32), slope_over_scale, q_seg, k_seg,
                          MASKED, PRECISION)
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        rescale = tl.exp2((row_max - new_max) * log2_scale)
        # Subtract before scaling: with FMA contraction, s * c - m * c rounds m * c but not
        # s * c, and for a row that has seen only masked keys (s = m = MASK_VALUE) the
        # rounding error of 1e29-sized numbers lands in exp2 (wrong rows on an H100).
        p = tl.exp2((s - new_max[:, None]) * log2_scale)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = _tile(V, base, keys, ROW_STRIDE, HEAD_DIM)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def forward_kernel(Q, K, V, QSEG, KSEG, SLOPES, PLAN, O, LSE, scale: tl.constexpr,
                   SEQ: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, N_ROWS: tl.constexpr,
                   SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block, batch, head): output rows and their logsumexp."""
    q_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    ROW_STRIDE: tl.constexpr = HEADS * HEAD_DIM
    base = batch * SEQ * ROW_STRIDE + head * HEAD_DIM
    seg_base = batch * SEQ
    rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q = _tile(Q, base, rows, ROW_STRIDE, HEAD_DIM)
    q_seg = tl.load(QSEG + seg_base + rows)
    q_pos = rows.to(tl.float32)
    slope_over_scale = tl.load(SLOPES + head) / scale
    log2_scale = scale * LOG2_E
    lo, hi, start, end = _plan(PLAN, batch, q_block, N_ROWS)

    acc = tl.zeros((BLOCK_Q, HEAD_DIM), dtype=tl.float32)
    row_max = tl.full((BLOCK_Q,), MASK_VALUE, dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    # Without SPLIT the unmasked run is empty and every visited block is masked.
    mid_start = start if SPLIT else hi
    mid_end = end if SPLIT else hi
    acc, row_max, row_sum = _forward_blocks(
        acc, row_max, row_sum, q, q_pos, q_seg, K, V, KSEG, base, seg_base, lo, mid_start,
        slope_over_scale, log2_scale, ROW_STRIDE, HEAD_DIM, BLOCK_K, True, PRECISION)
    acc, row_max, row_sum = _forward_blocks(
        acc, row_max, row_sum, q, q_pos, q_seg, K, V, KSEG, base, seg_base, mid_start, mid_end,
        slope_over_scale, log2_scale, ROW_STRIDE, HEAD_DIM, BLOCK_K, False, PRECISION)
    acc, row_max, row_sum = _forward_blocks(
        acc, row_max, row_sum, q, q_pos, q_seg, K, V, KSEG, base, seg_base, mid_end, hi,
        slope_over_scale, log2_scale, ROW_STRIDE, HEAD_DIM, BLOCK_K, True, PRECISION)

    sees_keys = (q_seg != PAD_QUERY_SEGMENT) & (row_sum > 0.0)
    safe_sum = tl.where(sees_keys, row_sum, 1.0)
    out = tl.where(sees_keys[:, None], acc / safe_sum[:, None], 0.0)
    _store_tile(O, base, rows, out, ROW_STRIDE, HEAD_DIM)
    lse = tl.where(sees_keys, row_max * log2_scale + tl.log2(safe_sum), EMPTY_ROW_LSE)
    tl.store(LSE + (batch * HEADS + head) * SEQ + rows, lse)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, k_pos, k_seg, Q, DO, QSEG, LSE, DELTA, base, seg_base,
                 stats_base, first, last, slope_over_scale, log2_scale,
                 ROW_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV contributions of query blocks [first, last), on transposed [keys, queries] tiles."""
    for q_block in range(first, last):
        rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q = _tile(Q, base, rows, ROW_STRIDE, HEAD_DIM)
        q_seg = tl.load(QSEG + seg_base + rows)
        s_t = _alibi_scores(k, q, k_pos, rows.to(tl.float32), slope_over_scale, k_seg, q_seg,
                            MASKED, PRECISION)
        lse = tl.load(LSE + stats_base + rows)
        p_t = tl.exp2(s_t * log2_scale - lse[None, :])
        do = _tile(DO, base, rows, ROW_STRIDE, HEAD_DIM)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        delta = tl.load(DELTA + stats_base + rows)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def dkdv_kernel(Q, K, V, DO, QSEG, KSEG, SLOPES, PLAN, LSE, DELTA, DK, DV, scale: tl.constexpr,
                SEQ: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, N_ROWS: tl.constexpr,
                SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (key block, batch, head), looping over the visible query blocks."""
    k_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    ROW_STRIDE: tl.constexpr = HEADS * HEAD_DIM
    base = batch * SEQ * ROW_STRIDE + head * HEAD_DIM
    seg_base = batch * SEQ
    stats_base = (batch * HEADS + head) * SEQ
    keys = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k = _tile(K, base, keys, ROW_STRIDE, HEAD_DIM)
    v = _tile(V, base, keys, ROW_STRIDE, HEAD_DIM)
    k_seg = tl.load(KSEG + seg_base + keys)
    k_pos = keys.to(tl.float32)
    slope_over_scale = tl.load(SLOPES + head) / scale
    log2_scale = scale * LOG2_E
    lo, hi, start, end = _plan(PLAN, batch, k_block, N_ROWS)

    dk = tl.zeros((BLOCK_K, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_K, HEAD_DIM), dtype=tl.float32)
    mid_start = start if SPLIT else hi
    mid_end = end if SPLIT else hi
    dk, dv = _dkdv_blocks(dk, dv, k, v, k_pos, k_seg, Q, DO, QSEG, LSE, DELTA, base, seg_base,
                          stats_base, lo, mid_start, slope_over_scale, log2_scale, ROW_STRIDE,
                          HEAD_DIM, BLOCK_Q, True, PRECISION)
    dk, dv = _dkdv_blocks(dk, dv, k, v, k_pos, k_seg, Q, DO, QSEG, LSE, DELTA, base, seg_base,
                          stats_base, mid_start, mid_end, slope_over_scale, log2_scale,
                          ROW_STRIDE, HEAD_DIM, BLOCK_Q, False, PRECISION)
    dk, dv = _dkdv_blocks(dk, dv, k, v, k_pos, k_seg, Q, DO, QSEG, LSE, DELTA, base, seg_base,
                          stats_base, mid_end, hi, slope_over_scale, log2_scale, ROW_STRIDE,
                          HEAD_DIM, BLOCK_Q, True, PRECISION)
    _store_tile(DK, base, keys, dk * scale, ROW_STRIDE, HEAD_DIM)
    _store_tile(DV, base, keys, dv, ROW_STRIDE, HEAD_DIM)


@triton.jit
def _dq_blocks(dq, q, do, q_pos, q_seg, lse, delta, K, V, KSEG, base, seg_base, first, last,
               slope_over_scale, log2_scale, ROW_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_K: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """dQ contributions of key blocks [first, last)."""
    for k_block in range(first, last):
        keys = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        k = _tile(K, base, keys, ROW_STRIDE, HEAD_DIM)
        k_seg = tl.load(KSEG + seg_base + keys)
        s = _alibi_scores(q, k, q_pos, keys.to(tl.float32), slope_over_scale, q_seg, k_seg,
                          MASKED, PRECISION)
        p = tl.exp2(s * log2_scale - lse[:, None])
        v = _tile(V, base, keys, ROW_STRIDE, HEAD_DIM)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def dq_kernel(Q, K, V, DO, QSEG, KSEG, SLOPES, PLAN, LSE, DELTA, DQ, scale: tl.constexpr,
              SEQ: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, N_ROWS: tl.constexpr,
              SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (query block, batch, head), looping over the visible key blocks."""
    q_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    ROW_STRIDE: tl.constexpr = HEADS * HEAD_DIM
    base = batch * SEQ * ROW_STRIDE + head * HEAD_DIM
    seg_base = batch * SEQ
    stats_base = (batch * HEADS + head) * SEQ
    rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q = _tile(Q, base, rows, ROW_STRIDE, HEAD_DIM)
    do = _tile(DO, base, rows, ROW_STRIDE, HEAD_DIM)
    q_seg = tl.load(QSEG + seg_base + rows)
    lse = tl.load(LSE + stats_base + rows)
    delta = tl.load(DELTA + stats_base + rows)
    q_pos = rows.to(tl.float32)
    slope_over_scale = tl.load(SLOPES + head) / scale
    log2_scale = scale * LOG2_E
    lo, hi, start, end = _plan(PLAN, batch, q_block, N_ROWS)

    dq = tl.zeros((BLOCK_Q, HEAD_DIM), dtype=tl.float32)
    mid_start = start if SPLIT else hi
    mid_end = end if SPLIT else hi
    dq = _dq_blocks(dq, q, do, q_pos, q_seg, lse, delta, K, V, KSEG, base, seg_base, lo,
                    mid_start, slope_over_scale, log2_scale, ROW_STRIDE, HEAD_DIM, BLOCK_K,
                    True, PRECISION)
    dq = _dq_blocks(dq, q, do, q_pos, q_seg, lse, delta, K, V, KSEG, base, seg_base, mid_start,
                    mid_end, slope_over_scale, log2_scale, ROW_STRIDE, HEAD_DIM, BLOCK_K,
                    False, PRECISION)
    dq = _dq_blocks(dq, q, do, q_pos, q_seg, lse, delta, K, V, KSEG, base, seg_base, mid_end,
                    hi, slope_over_scale, log2_scale, ROW_STRIDE, HEAD_DIM, BLOCK_K, True,
                    PRECISION)
    _store_tile(DQ, base, rows, dq * scale, ROW_STRIDE, HEAD_DIM)
