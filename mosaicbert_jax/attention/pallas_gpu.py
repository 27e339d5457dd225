"""Flash attention with in-kernel ALiBi and segment masking, in Pallas (Triton backend).

Computes softmax(q k^T * scale - slope_h * |i - j|, masked to same-segment non-pad keys) v
without ever materialising the [heads, seq, seq] bias: each program rebuilds its tile of the
bias from iotas and its head's slope. Forward and backward (FlashAttention-2 split: one
kernel for dK/dV looping over query blocks, one for dQ looping over key blocks) are Pallas
kernels tied together with a custom_vjp. Optionally (BlockSizes.one_pass_backward_max_seq),
a sequence that one key block spans gets a one-pass backward: the dK/dV kernel then sees
every key of its row and writes dQ as well, so the dQ kernel's recomputation is saved.
Blocks whose segments cannot meet are never visited (see block_sparsity.py), so rows packed
with short documents cost less.

An optional sliding window w > 0 (a static int: query i sees key j only when |i - j| <= w)
narrows the same block plan to the band around the diagonal, so key blocks outside it are
never visited; only masked blocks compare |i - j| with w. With w = 0 the kernels are the
full-attention ones, unchanged.

Kernels index q, k, v in their [batch, seq, heads, head_dim] layout through squeezed block
dims, so no transposes are needed around them. Softmax statistics live in log2 units
(exp2 with scale * log2(e) folded in); the stored logsumexp is in the same units.

The fused-QKV entry (flash_attention_qkv) runs the same kernels on the projection's
[batch, seq, 3, heads, head_dim] output: the BlockSpecs fix the slot, so q, k, v are read
in place, and the backward writes d(qkv) as one array (dQ into slot 0, then dK/dV into
slots 1 and 2 of the same buffer, aliased): no slice copies or concatenate around the kernels.
delta = rowsum(dO * O) is one XLA pass before the dQ kernel (BlockSizes.delta_in_dq_kernel:
the dQ kernel computes it from the tiles it loads, 14 fewer kernels but a dQ kernel 0.3 ms a
step slower; the step measured 0.5 ms faster with FP8 and the same in bf16 with the XLA pass).
It also takes the projection's bias b = (b_q, b_k, b_v) ([3, heads, head_dim]) instead of a
bias-add pass over qkv (1.1 ms of a 51 ms base step on an H200: cuBLAS did not fuse that add),
and touches no tile in a loop for it: softmax is shift-invariant per query, so b_k changes
no output (q . b_k is constant along a query's keys), and its rows sum to 1, so b_v adds
once to each output row that sees keys. The kernels add b_q to q where q is loaded once
(forward, dQ); the dK/dV kernel, which loads q per block, adds the per-key k . b_q to its
logit tile and rowsum(ds) b_q to dK at the end; the backward's delta uses the output
without b_v. d(b_q) and d(b_v) are the column sums of dQ and dV, which the kernels write
per program (no pass over d(qkv)); d(b_k) is exactly 0, as each query's dS row sums to 0.

qkv_forward / qkv_backward_fp8 are the same kernels for the FP8 QKV projection + attention
op (fused/fp8_attention.py): there the dQ and dK/dV kernels write d(qkv) times an inverse
scale as float8, row-major and transposed ([3, heads, head_dim, batch, seq]), with one amax
per program, instead of the bf16 d(qkv) the projection's backward would quantise in a pass
of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mosaicbert_jax.attention.block_sparsity import (check_qkv_bias, check_window,
                                                    fully_visible_block_ranges,
                                                    pad_sequence, visible_block_ranges)
from mosaicbert_jax.field_overrides import parse_field_overrides
from mosaicbert_jax.fp8 import to_fp8

# JAX 0.11 marks its Pallas Triton backend deprecated and warns at every lowering; this
# kernel is ours and keeps working until that backend is removed, so the warning is noise.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

LOG2_E = math.log2(math.e)
# Masked logits of the forward are -inf, so exp2 of them is exactly 0 however the compiler
# fuses s * c - m * c. A finite mask such as -1e30 is not safe there: XLA (CPU, JAX 0.10) and
# ptxas may contract it into fma(s, c, -round(m * c)), and for a row that has seen only
# masked keys (s = m = -1e30) that leaves the rounding error of a 1e29-sized product,
# about +-1e21, in exp2: inf, then 0 * inf = NaN at the next rescale (issue 14).
FORWARD_MASK_VALUE = -math.inf
# Backward masks stay finite: there s * c - lse never cancels (lse is a real logsumexp or
# EMPTY_ROW_LSE), so exp2 underflows to 0 under any contraction.
MASK_VALUE = -1e30
# Stored logsumexp of query rows that see no key: exp2(anything - this) = 0 in backward.
EMPTY_ROW_LSE = 1e30
# Query-side id of padding; keys keep id 0, so a padding query matches no key at all.
_PAD_QUERY_SEGMENT = jnp.iinfo(jnp.int32).min


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch settings of the three kernels (forward, dK/dV, dQ)."""
    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 32
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 3
    num_stages_bwd: int = 3
    # Visit block pairs inside one document without the per-element mask (3 loops a kernel).
    unmasked_interior: bool = True
    # Sequences (after padding) of at most this many tokens, a power of two, get a one-pass
    # backward: one key block spans the sequence, so the dK/dV kernel also writes each query
    # block's whole dQ and the dQ kernel (which recomputes s, p and dp) is not run. 0: off.
    one_pass_backward_max_seq: int = 0
    # True: the dQ kernel (which runs first) computes delta = rowsum(dO * O) for its rows and
    # writes it for the dK/dV kernel; False (measured faster, benchmarks/RESULTS.md session
    # 12): one XLA pass over O and dO computes it.
    delta_in_dq_kernel: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            size = getattr(self, f.name)
            if f.name.startswith("block_") and (size < 16 or size & (size - 1)):
                raise ValueError(f"{f.name}={size} must be a power of two >= 16 (Triton tiles)")

    def blocks(self) -> tuple[int, ...]:
        return (self.block_q, self.block_k, self.block_q_dkv, self.block_k_dkv,
                self.block_q_dq, self.block_k_dq)

    def shrunk_to(self, size: int) -> "BlockSizes":
        """The same settings with every block capped at `size` (for short sequences)."""
        return dataclasses.replace(self, **{
            f.name: min(getattr(self, f.name), size) for f in dataclasses.fields(self)
            if f.name.startswith("block_")})


_BLOCK_OVERRIDES: list[dict] = [{}]


def set_block_overrides(overrides: dict) -> None:
    """BlockSizes fields every later default_block_sizes_for_head_dim takes (so the benchmarks
    can time a variant inside the whole train step); {} restores the defaults."""
    _BLOCK_OVERRIDES[0] = dict(overrides)


def parse_block_overrides(text: str) -> dict:
    """'one_pass_backward_max_seq=128,num_warps_bwd=8' -> {field: int}; unknown fields or
    values that are not ints raise a one-line ValueError."""
    return parse_field_overrides(text, BlockSizes, "attention block override")


def default_block_sizes_for_head_dim(seq_len: int, head_dim: int) -> BlockSizes:
    """Block sizes for a sequence length and head dim (see docs/attention.md), with any
    set_block_overrides applied.

    From 256 tokens up: the large blocks measured on an H100. Up to 128 tokens: 64-blocks,
    so packed rows of short documents skip more and the grid has more programs; below 64
    the blocks shrink to the (power-of-two) sequence length.
    """
    sizes = BlockSizes() if head_dim <= 64 else BlockSizes(num_warps=8, num_warps_bwd=8)
    if seq_len <= 128:
        sizes = sizes.shrunk_to(64)
    # Overrides come after the 64-cap, so a benchmark can try 128-blocks at 128 tokens.
    sizes = dataclasses.replace(sizes, **_BLOCK_OVERRIDES[0])
    return sizes.shrunk_to(max(16, pl.next_power_of_2(seq_len)))


def _alibi_logits(q, k, q_pos, k_pos, slope_over_scale):
    """q k^T - (slope / scale) * |i - j| in fp32; times scale this is the reference logit."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s - slope_over_scale * jnp.abs(q_pos[:, None] - k_pos[None, :])


def _within_window(row_pos, col_pos, window: int):
    """bool [rows, cols]: |i - j| <= window for fp32 positions (exact below 2^24)."""
    return jnp.abs(row_pos[:, None] - col_pos[None, :]) <= window


def _positions(start, size):
    return (start + lax.broadcasted_iota(jnp.int32, (size,), 0)).astype(jnp.float32)


def _visit_blocks(plan_ref, row_block, body, carry, split: bool):
    """Runs body(block, carry, masked) over the visible blocks [lo, hi) of this row block.

    With split, the run [start, end) of blocks that need no mask gets the unmasked body;
    plan_ref rows are lo, hi, start, end (see block_sparsity.py).
    """
    lo, hi = plan_ref[0, row_block], plan_ref[1, row_block]
    masked = functools.partial(body, masked=True)
    if not split:
        return lax.fori_loop(lo, hi, masked, carry)
    start, end = plan_ref[2, row_block], plan_ref[3, row_block]
    carry = lax.fori_loop(lo, start, masked, carry)
    carry = lax.fori_loop(start, end, functools.partial(body, masked=False), carry)
    return lax.fori_loop(end, hi, masked, carry)


def _forward_kernel(plan_ref, slopes_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, scale: float, block_k: int, split: bool, window: int,
                    bias_ref=None):
    q_block, head = pl.program_id(0), pl.program_id(2)
    block_q = q_ref.shape[0]
    q = q_ref[...] if bias_ref is None else _plus_bias(q_ref[...], bias_ref, 0)
    q_seg = qseg_ref[...]
    q_pos = _positions(q_block * block_q, block_q)
    slope_over_scale = slopes_ref[head] / scale
    log2_scale = scale * LOG2_E

    def visit_key_block(k_block, carry, masked):
        acc, row_max, row_sum = carry
        keys = pl.ds(pl.multiple_of(k_block * block_k, block_k), block_k)
        k = k_ref[keys, :]
        k_pos = _positions(k_block * block_k, block_k)
        s = _alibi_logits(q, k, q_pos, k_pos, slope_over_scale)
        if masked:
            visible = q_seg[:, None] == kseg_ref[keys][None, :]
            if window:
                visible = visible & _within_window(q_pos, k_pos, window)
            s = jnp.where(visible, s, FORWARD_MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        # A row that has seen no key yet keeps max -inf (carried on as is); it is shifted by
        # 0 instead, so its exp2(-inf - shift) is 0 rather than NaN. One select per row; an
        # unmasked tile has finite logits, so its max is finite and needs none.
        shift = jnp.where(new_max == FORWARD_MASK_VALUE, 0.0, new_max) if masked else new_max
        rescale = jnp.exp2((row_max - shift) * log2_scale)
        p = jnp.exp2(s * log2_scale - (shift * log2_scale)[:, None])
        row_sum = row_sum * rescale + jnp.sum(p, axis=1)
        v = v_ref[keys, :]
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return acc * rescale[:, None] + pv, new_max, row_sum

    carry = (jnp.zeros(q_ref.shape, jnp.float32),
             jnp.full((block_q,), FORWARD_MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    acc, row_max, row_sum = _visit_blocks(plan_ref, q_block, visit_key_block, carry, split)
    sees_keys = (q_seg != _PAD_QUERY_SEGMENT) & (row_sum > 0.0)
    safe_sum = jnp.where(sees_keys, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    if bias_ref is not None:  # softmax rows sum to 1: sum_j p_ij (v_j + b_v) = o_i + b_v
        out = out + bias_ref[2, :].astype(jnp.float32)[None, :]
    o_ref[...] = jnp.where(sees_keys[:, None], out, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(sees_keys, row_max * log2_scale + jnp.log2(safe_sum), EMPTY_ROW_LSE)


def _dkdv_kernel(plan_ref, slopes_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, dq_ref=None, *, scale: float, block_q: int,
                 split: bool, window: int, bias_ref=None, db_v_ref=None, db_q_ref=None):
    """dK, dV of one key block over the query blocks it sees. With dq_ref (one-pass backward:
    this key block is the whole sequence), also every query block's dQ, written as visited;
    query blocks outside the plan's [lo, hi) see no key and get zeros. With bias_ref, q is
    read without b_q: each key's k . b_q joins its logits and rowsum(ds) b_q joins dK; then
    db_v_ref (and db_q_ref, one pass) get this block's column sums of dV (and dQ)."""
    k_block, head = pl.program_id(0), pl.program_id(2)
    block_k = k_ref.shape[0]
    k, v = k_ref[...], v_ref[...]
    if bias_ref is not None:
        q_bias = bias_ref[0, :].astype(jnp.float32)[None, :]
        key_dot_q_bias = jnp.sum(k.astype(jnp.float32) * q_bias, axis=1)
    k_seg = kseg_ref[...]
    k_pos = _positions(k_block * block_k, block_k)
    slope_over_scale = slopes_ref[head] / scale
    log2_scale = scale * LOG2_E

    def visit_query_block(q_block, carry, masked):
        rows = pl.ds(pl.multiple_of(q_block * block_q, block_q), block_q)
        q = q_ref[rows, :]
        # Transposed tile [block_k, block_q]: dV and dK then need no transposes of p / ds.
        q_pos = _positions(q_block * block_q, block_q)
        s_t = _alibi_logits(k, q, k_pos, q_pos, slope_over_scale)
        if bias_ref is not None:
            s_t = s_t + key_dot_q_bias[:, None]
        if masked:
            visible = k_seg[:, None] == qseg_ref[rows][None, :]
            if window:
                visible = visible & _within_window(k_pos, q_pos, window)
            s_t = jnp.where(visible, s_t, MASK_VALUE)
        p_t = jnp.exp2(s_t * log2_scale - lse_ref[rows][None, :])
        do = do_ref[rows, :]
        carry = dict(carry)
        carry["dv"] += lax.dot_general(p_t.astype(do.dtype), do, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[rows][None, :])
        carry["dk"] += lax.dot_general(ds_t.astype(q.dtype), q, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
        if bias_ref is not None:
            carry["ds_sum"] += jnp.sum(ds_t, axis=1)
        if dq_ref is not None:
            dq = lax.dot_general(ds_t.astype(k.dtype), k, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale
            dq_ref[rows, :] = dq.astype(dq_ref.dtype)
            if db_q_ref is not None:
                carry["dq_sum"] += jnp.sum(dq, axis=0)
        return carry

    if dq_ref is not None:
        _zero_blocks_outside(dq_ref, plan_ref[0, k_block], plan_ref[1, k_block], block_q)
    carry = {"dk": jnp.zeros(k_ref.shape, jnp.float32), "dv": jnp.zeros(k_ref.shape, jnp.float32)}
    if bias_ref is not None:  # rowsum(dS) for the k . b_q term of dK
        carry["ds_sum"] = jnp.zeros((block_k,), jnp.float32)
    if db_q_ref is not None:  # given with dq_ref only (one pass)
        carry["dq_sum"] = jnp.zeros((k_ref.shape[1],), jnp.float32)
    carry = _visit_blocks(plan_ref, k_block, visit_query_block, carry, split)
    dk = carry["dk"]
    if bias_ref is not None:
        dk = dk + carry["ds_sum"][:, None] * q_bias
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = carry["dv"].astype(dv_ref.dtype)
    if db_v_ref is not None:
        db_v_ref[...] = jnp.sum(carry["dv"], axis=0)
    if db_q_ref is not None:
        db_q_ref[...] = carry["dq_sum"]


def _zero_blocks_outside(ref, lo, hi, block: int) -> None:
    """Zeros the row blocks of ref before lo and from hi on, one block-sized store each (so
    no two stores of the program ever touch the same rows)."""
    zero = jnp.zeros((block, ref.shape[-1]), ref.dtype)

    def store(i, carry):
        ref[pl.ds(pl.multiple_of(i * block, block), block), :] = zero
        return carry

    lax.fori_loop(0, lo, store, 0)
    lax.fori_loop(hi, ref.shape[0] // block, store, 0)


def _dq_kernel(plan_ref, slopes_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_source_ref, dq_ref, delta_ref=None, *, scale: float,
               block_k: int, split: bool, window: int, bias_ref=None, db_q_ref=None):
    """dQ of one query block over the key blocks it sees. It runs before the dK/dV kernel.
    With delta_ref, delta_source_ref is the output O and the kernel also writes its rows'
    delta = rowsum(dO * O) (O without b_v) there, so no separate pass reads O and dO;
    without, delta_source_ref holds delta. With bias_ref, db_q_ref gets this block's column
    sums of dQ."""
    q_block, head = pl.program_id(0), pl.program_id(2)
    block_q = q_ref.shape[0]
    q, do = q_ref[...], do_ref[...]
    if bias_ref is not None:
        q = _plus_bias(q, bias_ref, 0)
    if delta_ref is None:
        delta = delta_source_ref[...]
    else:
        out = delta_source_ref[...].astype(jnp.float32)
        if bias_ref is not None:
            out = out - bias_ref[2, :].astype(jnp.float32)[None, :]
        delta = jnp.sum(out * do.astype(jnp.float32), axis=1)
        delta_ref[...] = delta
    q_seg, lse = qseg_ref[...], lse_ref[...]
    q_pos = _positions(q_block * block_q, block_q)
    slope_over_scale = slopes_ref[head] / scale
    log2_scale = scale * LOG2_E

    def visit_key_block(k_block, dq, masked):
        keys = pl.ds(pl.multiple_of(k_block * block_k, block_k), block_k)
        k = k_ref[keys, :]
        k_pos = _positions(k_block * block_k, block_k)
        s = _alibi_logits(q, k, q_pos, k_pos, slope_over_scale)
        if masked:
            visible = q_seg[:, None] == kseg_ref[keys][None, :]
            if window:
                visible = visible & _within_window(q_pos, k_pos, window)
            s = jnp.where(visible, s, MASK_VALUE)
        p = jnp.exp2(s * log2_scale - lse[:, None])
        dp = lax.dot_general(do, v_ref[keys, :], (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

    dq = _visit_blocks(plan_ref, q_block, visit_key_block, jnp.zeros(q_ref.shape, jnp.float32),
                       split) * scale
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if db_q_ref is not None:
        db_q_ref[...] = jnp.sum(dq, axis=0)


class _Specs:
    """BlockSpecs shared by the kernels; grids are (row_block, batch, head).

    Token specs take a slot: None for a [batch, seq, heads, head_dim] array, 0/1/2 for
    that slice of a fused [batch, seq, 3, heads, head_dim] one (the slot dim squeezed).
    """

    def __init__(self, seq: int, head_dim: int, num_heads_padded: int, num_blocks_padded: int):
        self.seq, self.head_dim = seq, head_dim
        self.slopes = pl.BlockSpec((num_heads_padded,), lambda i, b, h: (0,))
        self.plan = pl.BlockSpec((None, 4, num_blocks_padded), lambda i, b, h: (b, 0, 0))

    def tokens(self, block: int, slot: Optional[int] = None) -> pl.BlockSpec:
        if slot is None:
            return pl.BlockSpec((None, block, None, self.head_dim), lambda i, b, h: (b, i, h, 0))
        return pl.BlockSpec((None, block, None, None, self.head_dim),
                            lambda i, b, h: (b, i, slot, h, 0))

    def all_tokens(self, slot: Optional[int] = None) -> pl.BlockSpec:
        if slot is None:
            return pl.BlockSpec((None, self.seq, None, self.head_dim),
                                lambda i, b, h: (b, 0, h, 0))
        return pl.BlockSpec((None, self.seq, None, None, self.head_dim),
                            lambda i, b, h: (b, 0, slot, h, 0))

    def tokens_all_slots(self, block: int) -> pl.BlockSpec:
        """[block, 3, head_dim] of a fused array: one output block for two slots' tiles."""
        return pl.BlockSpec((None, block, 3, None, self.head_dim),
                            lambda i, b, h: (b, i, 0, h, 0))

    def transposed_tokens(self, block: int, slot: int) -> pl.BlockSpec:
        """[head_dim, block] of a [3, heads, head_dim, batch, seq] array (d(qkv) transposed)."""
        return pl.BlockSpec((None, None, self.head_dim, None, block),
                            lambda i, b, h: (slot, h, 0, b, i))

    def transposed_all_slots(self, block: int) -> pl.BlockSpec:
        """[3, head_dim, block] of the transposed layout: transposed_tokens for every slot."""
        return pl.BlockSpec((3, None, self.head_dim, None, block),
                            lambda i, b, h: (0, h, 0, b, i))

    @staticmethod
    def amax(heads: int) -> pl.BlockSpec:
        """One float32 per program of a [row_blocks, batch * heads] array."""
        return pl.BlockSpec((1, 1), lambda i, b, h: (i, b * heads + h))

    @staticmethod
    def segments(block: int) -> pl.BlockSpec:
        return pl.BlockSpec((None, block), lambda i, b, h: (b, i))

    def all_segments(self) -> pl.BlockSpec:
        return pl.BlockSpec((None, self.seq), lambda i, b, h: (b, 0))

    @staticmethod
    def row_stats(block: int) -> pl.BlockSpec:
        return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))

    def all_row_stats(self) -> pl.BlockSpec:
        return pl.BlockSpec((None, None, self.seq), lambda i, b, h: (b, h, 0))


class _SlotRef:
    """One slot of a [rows, 3, head_dim] output block, written like a [rows, head_dim] ref
    (`ref[...] = tile` or `ref[rows, :] = tile`), so the fused backward runs the dK/dV
    kernel as it is."""

    def __init__(self, ref, slot: int):
        self._ref, self._slot = ref, slot

    @property
    def dtype(self):
        return self._ref.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self._ref.shape[0], self._ref.shape[2])

    def __setitem__(self, index, value) -> None:
        if index is Ellipsis:
            self._ref[:, self._slot, :] = value
            return
        rows, columns = index
        assert columns == slice(None), "kernels write whole rows"
        self._ref[rows, self._slot, :] = value


def _dkdv_into_aliased_slots(k_slot: int, v_slot: int, *refs, **params) -> None:
    """_dkdv_kernel writing dK and dV into two slots of the d(qkv) block that the dQ kernel
    created (aliased input, never read: its dQ slot keeps its values)."""
    *inputs, _aliased_dqkv_ref, dqkv_ref = refs
    _dkdv_kernel(*inputs, _SlotRef(dqkv_ref, k_slot), _SlotRef(dqkv_ref, v_slot), **params)


def _one_pass_into_slots(q_slot: int, k_slot: int, v_slot: int, *refs, **params) -> None:
    """The one-pass _dkdv_kernel writing dQ, dK and dV into the slots of one output block."""
    *inputs, dqkv_ref = refs
    _dkdv_kernel(*inputs, _SlotRef(dqkv_ref, k_slot), _SlotRef(dqkv_ref, v_slot),
                 _SlotRef(dqkv_ref, q_slot), **params)


def _one_pass_separate(*refs, **params) -> None:
    """The one-pass _dkdv_kernel with dQ, dK, dV outputs in that order (as _backward returns)."""
    *inputs, dq_ref, dk_ref, dv_ref = refs
    _dkdv_kernel(*inputs, dk_ref, dv_ref, dq_ref, **params)


class _Fp8SlotWriter:
    """A [rows, head_dim] output written as float8 twice: into one slot of d(qkv) (row-major,
    [rows, 3, head_dim] block) and of its transpose ([3, head_dim, rows] block), each tile
    first rounded to the compute dtype, so the bytes equal what fused.quantize_fp8 makes of
    the bf16 d(qkv) the plain kernels write. Remembers the tile's amax (`amax`, [1, 1])."""

    def __init__(self, ref, transposed_ref, slot: Optional[int], inv_scale, fp8_dtype,
                 dtype):
        self._ref, self._transposed, self._slot = ref, transposed_ref, slot
        self._inv, self._fp8_dtype, self.dtype = inv_scale, fp8_dtype, dtype
        self.amax = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self._ref.shape[0], self._ref.shape[-1])

    def __setitem__(self, index, value) -> None:
        assert index is Ellipsis, "the two-kernel backward writes whole tiles"
        x = value.astype(self.dtype).astype(jnp.float32)
        q = to_fp8(x, self._inv, self._fp8_dtype)
        if self._slot is None:
            self._ref[...] = q
            self._transposed[...] = q.T
        else:
            self._ref[:, self._slot, :] = q
            self._transposed[self._slot] = q.T
        self.amax = jnp.max(jnp.abs(x), axis=(0, 1), keepdims=True)


def _dq_into_fp8(fp8_dtype, dtype, *refs, **params) -> None:
    """_dq_kernel writing dQ as float8 (slot 0 of d(qkv) and of its transpose), plus the
    program's amax; refs: the 10 inputs, the inverse scale, those two outputs, the amax
    output and, with delta_in_dq_kernel, delta's."""
    inputs, (inv_ref, q_ref, qt_ref, amax_ref), delta = refs[:10], refs[10:14], refs[14:]
    writer = _Fp8SlotWriter(q_ref, qt_ref, None, inv_ref[0], fp8_dtype, dtype)
    _dq_kernel(*inputs, writer, *delta, **params)
    amax_ref[...] = writer.amax


def _dkdv_into_fp8(k_slot: int, v_slot: int, fp8_dtype, dtype, *refs, **params) -> None:
    """_dkdv_kernel writing dK and dV as float8 into their slots of the dQ kernel's float8
    d(qkv) and transpose (aliased inputs, never read), plus the program's amax."""
    *inputs, inv_ref, _aliased, _aliased_t, q_ref, qt_ref, amax_ref = refs
    k_writer, v_writer = (_Fp8SlotWriter(q_ref, qt_ref, slot, inv_ref[0], fp8_dtype, dtype)
                          for slot in (k_slot, v_slot))
    _dkdv_kernel(*inputs, k_writer, v_writer, **params)
    amax_ref[...] = jnp.maximum(k_writer.amax, v_writer.amax)


def _with_bias(kernel, in_specs: list, args: list, bias, head_dim: int,
               grad_outputs: tuple[str, ...] = ()):
    """(kernel, in_specs, args) with the projection bias [3, heads, head_dim] inserted after
    q, k, v (inputs 4-6) and handed to the kernel as bias_ref; unchanged for bias None.
    grad_outputs: the keyword names the kernel takes its last len(grad_outputs) refs under
    (the bias-gradient partial sums, outputs after the kernel's own)."""
    if bias is None:
        return kernel, in_specs, args
    extra = len(grad_outputs)

    def biased(*refs):
        own = refs[8:len(refs) - extra]
        named = dict(zip(grad_outputs, refs[len(refs) - extra:]))
        return kernel(*refs[:7], *own, bias_ref=refs[7], **named)

    spec = pl.BlockSpec((3, None, head_dim), lambda i, b, h: (0, h, 0))
    return biased, in_specs[:7] + [spec] + in_specs[7:], args[:7] + [bias] + args[7:]


def _column_sums(batch: int, heads: int, n_blocks: int, head_dim: int):
    """(spec, shape) of a per-program partial sum: one float32 [head_dim] row per (row block,
    batch, head), summed over batch and blocks after the kernel."""
    spec = pl.BlockSpec((None, None, None, head_dim), lambda i, b, h: (b, h, i, 0))
    return spec, jax.ShapeDtypeStruct((batch, heads, n_blocks, head_dim), jnp.float32)


def _plus_bias(x, bias_ref, slot: int):
    """x + that slot's projection bias, in float32, rounded back to x's dtype (as the Dense
    layer's own bias add rounds)."""
    bias = bias_ref[slot, :].astype(jnp.float32)
    return (x.astype(jnp.float32) + bias[None, :]).astype(x.dtype)


# Separate q, k, v arrays, or slots 0, 1, 2 of one fused [batch, seq, 3, heads, head_dim].
_SEPARATE = (None, None, None)
QKV_SLOTS = (0, 1, 2)


def _pad_last(x: jax.Array, size: int, value=0) -> jax.Array:
    pad = [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])]
    return jnp.pad(x, pad, constant_values=value)


def _block_plan(segment_ids, block_rows, block_cols, window: int = 0):
    """int32 [batch, 4, n_row_blocks (padded to a power of two)]: lo, hi, start, end.

    Column blocks [lo, hi) are the ones a row block must visit; [start, end) inside them
    need no mask (see block_sparsity.py); window > 0 narrows both to the band.
    """
    lo, hi = visible_block_ranges(segment_ids, block_rows, block_cols, window)
    start, end = fully_visible_block_ranges(segment_ids, block_rows, block_cols, hi, window)
    plan = jnp.stack([lo, hi, start, end], axis=1)
    return _pad_last(plan, pl.next_power_of_2(plan.shape[-1]))


def _query_segments(segment_ids):
    return jnp.where(segment_ids == 0, _PAD_QUERY_SEGMENT, segment_ids)


def _padded_slopes(slopes):
    return _pad_last(slopes.astype(jnp.float32), pl.next_power_of_2(slopes.shape[0]))


def _forward(q, k, v, segment_ids, slopes, scale, sizes: BlockSizes, interpret: bool,
             window: int = 0, slots=_SEPARATE, bias=None):
    """Output [batch, seq, heads, head_dim] and logsumexp [batch, heads, seq] (log2 units).

    slots=QKV_SLOTS: q, k and v are one fused array (passed three times) read at its slots;
    bias [3, heads, head_dim] (fused only): the projection's bias (see the module docstring).
    """
    batch, seq = q.shape[:2]
    heads, head_dim = q.shape[-2:]
    q_slot, k_slot, v_slot = slots
    bq, bk = sizes.block_q, sizes.block_k
    plan = _block_plan(segment_ids, bq, bk, window)
    specs = _Specs(seq, head_dim, pl.next_power_of_2(heads), plan.shape[-1])
    kernel, in_specs, args = _with_bias(
        functools.partial(_forward_kernel, scale=scale, block_k=bk,
                          split=sizes.unmasked_interior, window=window),
        [specs.plan, specs.slopes, specs.segments(bq), specs.all_segments(),
         specs.tokens(bq, q_slot), specs.all_tokens(k_slot), specs.all_tokens(v_slot)],
        [plan, _padded_slopes(slopes), _query_segments(segment_ids), segment_ids, q, k, v],
        bias, head_dim)
    out, lse = pl.pallas_call(
        kernel,
        grid=(seq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=[specs.tokens(bq), specs.row_stats(bq)],
        out_shape=[jax.ShapeDtypeStruct((batch, seq, heads, head_dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps,
                                             num_stages=sizes.num_stages),
        interpret=interpret,
        name="alibi_flash_forward",
    )(*args)
    return out, lse


def _backward(q, k, v, segment_ids, slopes, out, lse, d_out, scale, sizes: BlockSizes,
              interpret: bool, window: int = 0, slots=_SEPARATE, bias=None, quantize=None):
    """((dq, dk, dv), None); with slots=QKV_SLOTS (d(qkv) [batch, seq, 3, heads, head_dim],
    d(bias) [3, heads, head_dim] float32 or None for bias None; bias: as in _forward).
    quantize (fused slots, two-kernel backward only): (inv_scale, fp8_dtype); d(qkv) is then
    ((float8 d(qkv), float8 [3, heads, head_dim, batch, seq] transpose, its float32 amax).

    Two kernels: dQ first (it also writes delta with sizes.delta_in_dq_kernel), then dK/dV,
    which with fused slots writes into the dQ kernel's d(qkv) buffer (aliased). d(b_q) and
    d(b_v) are the kernels' column sums of dQ and dV; d(b_k) is exactly 0 (each query's dS
    row sums to 0).
    """
    batch, seq = q.shape[:2]
    heads, head_dim = q.shape[-2:]
    q_slot, k_slot, v_slot = slots
    fused = q_slot is not None
    assert bias is None or fused, "the projection bias comes with the fused entry only"
    q_segments = _query_segments(segment_ids)
    padded_slopes = _padded_slopes(slopes)
    params = plgpu.CompilerParams(num_warps=sizes.num_warps_bwd,
                                  num_stages=sizes.num_stages_bwd)
    if uses_one_pass_backward(seq, sizes):
        assert quantize is None, "the float8 d(qkv) comes from the two-kernel backward"
        return _one_pass_backward(q, k, v, segment_ids, q_segments, padded_slopes, out, lse,
                                  d_out, scale, sizes, params, interpret, window, slots, bias)
    if quantize is not None:
        assert fused, "the float8 d(qkv) is written for the fused entry only"
        inv_scale, fp8_dtype = quantize
        inv_scale = jnp.asarray(inv_scale, jnp.float32).reshape(1)
        inv_spec = pl.BlockSpec((1,), lambda i, b, h: (0,))
        transposed = jax.ShapeDtypeStruct((3, heads, head_dim, batch, seq), fp8_dtype)
        amax_shape = lambda block: jax.ShapeDtypeStruct((seq // block, batch * heads),
                                                        jnp.float32)

    bq, bk = sizes.block_q_dq, sizes.block_k_dq
    plan = _block_plan(segment_ids, bq, bk, window)
    specs = _Specs(seq, head_dim, padded_slopes.shape[0], plan.shape[-1])
    db_spec, db_shape = _column_sums(batch, heads, seq // bq, head_dim)
    # With fused slots the dQ output is the whole d(qkv), whose slots 1 and 2 dK/dV fills.
    dq_kernel = _dq_kernel
    if quantize is None:
        out_specs, out_shape = [specs.tokens(bq, q_slot)], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        dq_kernel = functools.partial(_dq_into_fp8, fp8_dtype, q.dtype)
        out_specs = [specs.tokens(bq, q_slot), specs.transposed_tokens(bq, q_slot),
                     specs.amax(heads)]
        out_shape = [jax.ShapeDtypeStruct(q.shape, fp8_dtype), transposed, amax_shape(bq)]
    n_grads = len(out_specs)
    if sizes.delta_in_dq_kernel:  # the kernel reads O and writes delta
        delta_source, delta_spec = out, specs.tokens(bq)
        out_specs.append(specs.row_stats(bq))
        out_shape.append(jax.ShapeDtypeStruct(lse.shape, jnp.float32))
    else:
        delta_source, delta_spec = _delta(out, d_out, bias), specs.row_stats(bq)
    extra_specs, extra_args = ([inv_spec], [inv_scale]) if quantize is not None else ([], [])
    kernel, in_specs, args = _with_bias(
        functools.partial(dq_kernel, scale=scale, block_k=bk, split=sizes.unmasked_interior,
                          window=window),
        [specs.plan, specs.slopes, specs.segments(bq), specs.all_segments(),
         specs.tokens(bq, q_slot), specs.all_tokens(k_slot), specs.all_tokens(v_slot),
         specs.tokens(bq), specs.row_stats(bq), delta_spec] + extra_specs,
        [plan, padded_slopes, q_segments, segment_ids, q, k, v, d_out, lse, delta_source]
        + extra_args,
        bias, head_dim, ("db_q_ref",))
    outputs = pl.pallas_call(
        kernel,
        grid=(seq // bq, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs + [db_spec] * (bias is not None),
        out_shape=out_shape + [db_shape] * (bias is not None),
        compiler_params=params,
        interpret=interpret,
        name="alibi_flash_dq",
    )(*args)
    dq, rest = outputs[:n_grads], list(outputs[n_grads:])
    delta = rest.pop(0) if sizes.delta_in_dq_kernel else delta_source

    # Key blocks are the rows here: the same plan with rows and columns swapped.
    bq, bk = sizes.block_q_dkv, sizes.block_k_dkv
    plan = _block_plan(segment_ids, bk, bq, window)
    specs = _Specs(seq, head_dim, padded_slopes.shape[0], plan.shape[-1])
    db_spec, db_shape = _column_sums(batch, heads, seq // bk, head_dim)
    in_specs = [specs.plan, specs.slopes, specs.all_segments(), specs.segments(bk),
                specs.all_tokens(q_slot), specs.tokens(bk, k_slot), specs.tokens(bk, v_slot),
                specs.all_tokens(), specs.all_row_stats(), specs.all_row_stats()]
    args = [plan, padded_slopes, q_segments, segment_ids, q, k, v, d_out, lse, delta]
    if quantize is not None:  # dK and dV fill slots 1 and 2 of both float8 buffers in place
        kernel = functools.partial(_dkdv_into_fp8, k_slot, v_slot, fp8_dtype, q.dtype)
        in_specs += [inv_spec, specs.tokens_all_slots(bk), specs.transposed_all_slots(bk)]
        args += [inv_scale, dq[0], dq[1]]
        out_specs = [specs.tokens_all_slots(bk), specs.transposed_all_slots(bk),
                     specs.amax(heads)]
        out_shape = [jax.ShapeDtypeStruct(q.shape, fp8_dtype), transposed, amax_shape(bk)]
    elif fused:  # dK and dV fill slots 1 and 2 of the dQ kernel's buffer in place
        kernel = functools.partial(_dkdv_into_aliased_slots, k_slot, v_slot)
        in_specs.append(specs.tokens_all_slots(bk))
        args.append(dq[0])
        out_specs = [specs.tokens_all_slots(bk)]
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        kernel = _dkdv_kernel
        out_specs = [specs.tokens(bk)] * 2
        out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v)]
    n_grads = len(out_specs)
    kernel, in_specs, args = _with_bias(
        functools.partial(kernel, scale=scale, block_q=bq, split=sizes.unmasked_interior,
                          window=window), in_specs, args, bias, head_dim, ("db_v_ref",))
    aliases = ({len(args) - 2: 0, len(args) - 1: 1} if quantize is not None
               else {len(args) - 1: 0} if fused else {})
    grads = pl.pallas_call(
        kernel,
        grid=(seq // bk, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs + [db_spec] * (bias is not None),
        out_shape=out_shape + [db_shape] * (bias is not None),
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name="alibi_flash_dkdv",
    )(*args)
    if not fused:
        return (dq[0], *grads), None
    d_bias = None if bias is None else _bias_grad(rest[0], grads[n_grads])
    if quantize is None:
        return grads[0], d_bias
    return (grads[0], grads[1], jnp.maximum(jnp.max(dq[2]), jnp.max(grads[2]))), d_bias


def _bias_grad(db_q: jax.Array, db_v: jax.Array) -> jax.Array:
    """[3, heads, head_dim] float32 from the kernels' [batch, heads, blocks, head_dim] partial
    column sums of dQ and dV (one reduction over both); the b_k row is 0."""
    if db_q.shape != db_v.shape:  # different block counts: one reduction each
        d_q, d_v = (jnp.sum(x, axis=(0, 2)) for x in (db_q, db_v))
    else:
        d_q, d_v = jnp.sum(jnp.stack([db_q, db_v]), axis=(1, 3))
    return jnp.stack([d_q, jnp.zeros_like(d_q), d_v])


def _delta(out, d_out, bias):
    """rowsum(dO * O) [batch, heads, seq] float32 in one XLA pass, O without b_v (see the
    module docstring)."""
    out = out.astype(jnp.float32)
    if bias is not None:
        out = out - bias[2].astype(jnp.float32)
    return jnp.einsum("bshd,bshd->bhs", out, d_out.astype(jnp.float32))


def _one_pass_backward(q, k, v, segment_ids, q_segments, padded_slopes, out, lse, d_out,
                       scale, sizes: BlockSizes, params, interpret: bool, window: int, slots,
                       bias):
    """_backward's result from one dK/dV kernel whose key block spans the sequence and which
    writes dQ as visited (delta from _delta)."""
    batch, seq = q.shape[:2]
    heads, head_dim = q.shape[-2:]
    q_slot, k_slot, v_slot = slots
    fused = q_slot is not None
    delta = _delta(out, d_out, bias)
    bq, bk = sizes.block_q_dkv, seq
    plan = _block_plan(segment_ids, bk, bq, window)
    specs = _Specs(seq, head_dim, padded_slopes.shape[0], plan.shape[-1])
    if fused:  # one block spanning the slots
        kernel = functools.partial(_one_pass_into_slots, q_slot, k_slot, v_slot)
        out_specs = [specs.tokens_all_slots(bk)]
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        kernel = _one_pass_separate
        out_specs = [specs.tokens(bk)] * 3
        out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    db_spec, db_shape = _column_sums(batch, heads, 1, head_dim)
    kernel, in_specs, args = _with_bias(
        functools.partial(kernel, scale=scale, block_q=bq, split=sizes.unmasked_interior,
                          window=window),
        [specs.plan, specs.slopes, specs.all_segments(), specs.segments(bk),
         specs.all_tokens(q_slot), specs.tokens(bk, k_slot), specs.tokens(bk, v_slot),
         specs.all_tokens(), specs.all_row_stats(), specs.all_row_stats()],
        [plan, padded_slopes, q_segments, segment_ids, q, k, v, d_out, lse, delta],
        bias, head_dim, ("db_q_ref", "db_v_ref"))
    grads = pl.pallas_call(
        kernel,
        grid=(seq // bk, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs + [db_spec] * (2 * (bias is not None)),
        out_shape=out_shape + [db_shape] * (2 * (bias is not None)),
        compiler_params=params,
        interpret=interpret,
        name="alibi_flash_bwd_one_pass",
    )(*args)
    if not fused:
        return tuple(grads), None
    return grads[0], None if bias is None else _bias_grad(grads[1], grads[2])


def uses_one_pass_backward(seq: int, sizes: BlockSizes) -> bool:
    """True when the (padded) sequence is a power of two within one_pass_backward_max_seq."""
    return 0 < seq <= sizes.one_pass_backward_max_seq and not seq & (seq - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, segment_ids, slopes, scale, sizes, interpret, window):
    return _forward(q, k, v, segment_ids, slopes, scale, sizes, interpret, window)[0]


def _flash_fwd(q, k, v, segment_ids, slopes, scale, sizes, interpret, window):
    out, lse = _forward(q, k, v, segment_ids, slopes, scale, sizes, interpret, window)
    return out, (q, k, v, segment_ids, slopes, out, lse)


def _flash_bwd(scale, sizes, interpret, window, residuals, d_out):
    q, k, v, segment_ids, slopes, out, lse = residuals
    (dq, dk, dv), _ = _backward(q, k, v, segment_ids, slopes, out, lse, d_out, scale, sizes,
                                interpret, window)
    # Segment ids are integers and ALiBi slopes are constants of the model: no cotangent.
    return dq, dk, dv, None, jnp.zeros_like(slopes)


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash_qkv(qkv, bias, segment_ids, slopes, scale, sizes, interpret, window):
    return _forward(qkv, qkv, qkv, segment_ids, slopes, scale, sizes, interpret, window,
                    QKV_SLOTS, bias)[0]


def _flash_qkv_fwd(qkv, bias, segment_ids, slopes, scale, sizes, interpret, window):
    out, lse = _forward(qkv, qkv, qkv, segment_ids, slopes, scale, sizes, interpret, window,
                        QKV_SLOTS, bias)
    return out, (qkv, bias, segment_ids, slopes, out, lse)


def _flash_qkv_bwd(scale, sizes, interpret, window, residuals, d_out):
    qkv, bias, segment_ids, slopes, out, lse = residuals
    d_qkv, d_bias = _backward(qkv, qkv, qkv, segment_ids, slopes, out, lse, d_out, scale,
                              sizes, interpret, window, QKV_SLOTS, bias)
    d_bias = None if bias is None else d_bias.astype(bias.dtype)
    return d_qkv, d_bias, None, jnp.zeros_like(slopes)


_flash_qkv.defvjp(_flash_qkv_fwd, _flash_qkv_bwd)


def fp8_grad_block_sizes(seq: int, head_dim: int) -> Optional[BlockSizes]:
    """The default blocks of `seq` when qkv_backward_fp8 can run with them (no sequence
    padding, the two-kernel backward, a supported head_dim); None otherwise."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return None
    sizes = default_block_sizes_for_head_dim(seq, head_dim)
    if seq % max(sizes.blocks()) or uses_one_pass_backward(seq, sizes):
        return None
    return sizes


def qkv_forward(qkv: jax.Array, bias: Optional[jax.Array], segment_ids: jax.Array,
                slopes: jax.Array, scale: float, sizes: BlockSizes, interpret: bool = False,
                window: int = 0) -> tuple[jax.Array, jax.Array]:
    """(output [batch, seq, heads, head_dim], logsumexp) of the fused-QKV kernels, for an op
    that owns its backward (fused/fp8_attention.py): no padding (seq a multiple of every
    block), int32 segment ids, bias [3, heads, head_dim] in qkv's dtype or None."""
    return _forward(qkv, qkv, qkv, segment_ids, slopes, scale, sizes, interpret, window,
                    QKV_SLOTS, bias)


def qkv_backward_fp8(qkv: jax.Array, bias: Optional[jax.Array], segment_ids: jax.Array,
                     slopes: jax.Array, out: jax.Array, lse: jax.Array, d_out: jax.Array,
                     scale: float, sizes: BlockSizes, inv_scale: jax.Array, fp8_dtype,
                     interpret: bool = False, window: int = 0):
    """qkv_forward's backward with d(qkv) times inv_scale written as fp8_dtype by the kernels
    themselves: ((q [batch, seq, 3, heads, head_dim], q transposed [3, heads, head_dim, batch,
    seq], float32 amax of d(qkv)), float32 d(bias) [3, heads, head_dim] or None). The bytes
    are those of fused.quantize_fp8 on the bf16 d(qkv) of the plain backward."""
    return _backward(qkv, qkv, qkv, segment_ids, slopes, out, lse, d_out, scale, sizes,
                     interpret, window, QKV_SLOTS, bias, quantize=(inv_scale, fp8_dtype))


def _check_inputs(q: jax.Array) -> None:
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim={head_dim} is not supported by the Pallas kernel: it must "
                         "be a power of two >= 16 (64 and 128 are tuned); use "
                         "implementation='xla' for other sizes")
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"dtype {q.dtype} is not supported; use bfloat16, float16 or float32")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    slopes: jax.Array, scale: float, *, block_sizes: Optional[BlockSizes] = None,
                    interpret: bool = False, window: int = 0) -> jax.Array:
    """ALiBi + segment-masked attention on [batch, seq, heads, head_dim]; any seq length.

    segment_ids: [batch, seq] non-negative ints, 0 = padding. window: a static int; > 0
    limits each query to keys with |i - j| <= window (0: full attention). The sequence is padded
    internally (with padding segment 0) up to a multiple of the largest block and the output
    sliced back, so callers never see the blocking.
    """
    _check_inputs(q)
    window = check_window(window)
    seq = q.shape[1]
    sizes = block_sizes or default_block_sizes_for_head_dim(seq, q.shape[-1])
    (q, k, v), segment_ids = pad_sequence((q, k, v), segment_ids, max(sizes.blocks()))
    out = _flash(q, k, v, segment_ids, jnp.asarray(slopes, jnp.float32), float(scale), sizes,
                 interpret, window)
    return out[:, :seq]


def flash_attention_qkv(qkv: jax.Array, segment_ids: jax.Array, slopes: jax.Array,
                        scale: float, *, block_sizes: Optional[BlockSizes] = None,
                        interpret: bool = False, window: int = 0,
                        bias: Optional[jax.Array] = None) -> jax.Array:
    """flash_attention on the fused projection qkv [batch, seq, 3, heads, head_dim] (q, k, v
    in slots 0, 1, 2) -> [batch, seq, heads, head_dim].

    The kernels read the slots in place and the gradient is one d(qkv) array written by
    the kernels, so no slice copies or concatenate surround them; same blocks, padding and
    window as flash_attention. bias (the projection's, [3 * heads * head_dim] or
    [3, heads, head_dim]) is added to q, k, v in qkv's dtype, without a pass over qkv (see
    the module docstring); None: no bias, and the kernels do no bias work.
    """
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv shape {qkv.shape} must be [batch, seq, 3, heads, head_dim] "
                         "(q, k, v in slots 0, 1, 2); for separate arrays use flash_attention")
    _check_inputs(qkv)
    window = check_window(window)
    seq = qkv.shape[1]
    sizes = block_sizes or default_block_sizes_for_head_dim(seq, qkv.shape[-1])
    if bias is not None:
        check_qkv_bias(bias, *qkv.shape[3:])
        bias = jnp.reshape(bias, qkv.shape[2:]).astype(qkv.dtype)
    (qkv,), segment_ids = pad_sequence((qkv,), segment_ids, max(sizes.blocks()))
    out = _flash_qkv(qkv, bias, segment_ids, jnp.asarray(slopes, jnp.float32), float(scale),
                     sizes, interpret, window)
    return out[:, :seq]


def pallas_attention(q, k, v, segment_ids, slopes, scale, window: int = 0):
    """The compiled GPU kernel (registered as implementation 'pallas')."""
    return flash_attention(q, k, v, segment_ids, slopes, scale, window=window)


def pallas_attention_interpret(q, k, v, segment_ids, slopes, scale, window: int = 0):
    """The same kernels run by the Pallas interpreter: any backend, slow (for tests)."""
    return flash_attention(q, k, v, segment_ids, slopes, scale, interpret=True, window=window)


def pallas_attention_qkv(qkv, segment_ids, slopes, scale, window: int = 0, bias=None):
    """The compiled kernel's fused-QKV entry (used by attention_qkv for 'pallas')."""
    return flash_attention_qkv(qkv, segment_ids, slopes, scale, window=window, bias=bias)


def pallas_attention_qkv_interpret(qkv, segment_ids, slopes, scale, window: int = 0,
                                   bias=None):
    """The fused-QKV entry in the Pallas interpreter (attention_qkv for 'pallas_interpret')."""
    return flash_attention_qkv(qkv, segment_ids, slopes, scale, interpret=True, window=window,
                               bias=bias)
