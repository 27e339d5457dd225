"""Pallas (Triton backend) kernels for the memory-bound half of a MosaicBERT layer.

Two fused ops, each a custom_vjp over one forward and one backward kernel (and, for the FP8
MLP, the two GLU kernels again with float8 outputs: `glu_dropout_fp8`, `glu_dropout_fp8_grad`):
- `glu_dropout`: dropout(gelu(a) * b) from the up-projection h = [a | b]. The forward reads h
  once and writes the product once; the backward reads h and the cotangent once and writes dh
  once. Nothing else is stored: GELU, its derivative and the dropout mask are recomputed.
- `dropout_add_layernorm`: LayerNorm(dropout(x + x_bias) + residual). The forward reads x and
  the residual once and writes y plus two float32 row statistics; the backward recomputes the
  normalised input and writes d(x), d(residual) and per-block partial sums of d(scale),
  d(bias), d(x_bias) as one [blocks, 3, width] array (a block of up to 64 rows, walked a few
  rows at a time), which one reduction then sums.
All arithmetic is float32 in registers; the dropout mask is `dropout.keep_from_position` of
the element's (row, column), the same mask the unfused `hash_dropout` draws for the same seed.
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

from mosaicbert_jax.dropout import keep_from_position
from mosaicbert_jax.field_overrides import parse_field_overrides
from mosaicbert_jax.fused.reference import to_fp8

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LOG2_E = 1.0 / math.log(2.0)
# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7 on all of R (Pallas' Triton lowering has no erf).
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@dataclasses.dataclass(frozen=True)
class FusedBlocks:
    """Tile sizes and launch settings of the fused kernels (forward and backward apart)."""
    # The fastest of benchmarks/fused_ops.py's sweeps on an H200 (2026-12-01, base shapes;
    # the GLU variants were within 2% of each other).
    glu_rows: int = 8
    glu_cols: int = 256
    glu_warps: int = 4
    glu_rows_bwd: int = 8
    glu_cols_bwd: int = 256
    glu_warps_bwd: int = 4
    ln_rows: int = 4
    ln_warps: int = 4
    # The LayerNorm backward walks ln_rows_bwd rows at a time through a block of up to
    # ln_block_rows_bwd rows, so the partial sums of d(scale), d(bias), d(x_bias) it writes
    # are one row per block, not per ln_rows_bwd rows (at 4 rows a block those partials were
    # 3/4 of the bytes of d(x) again, plus a reduction pass over them).
    ln_rows_bwd: int = 4
    ln_block_rows_bwd: int = 64
    ln_warps_bwd: int = 4
    # Triton pipeline stages of the backward's row loop (2: no faster on an H200), and whether
    # it keeps its d(scale), d(bias), d(x_bias) sums as [ln_rows_bwd, chunk] tiles added
    # elementwise and reduced across rows once per block, instead of a reduction across
    # threads every step. Deferred sums at 4 rows a step: the backward went from 1.92 to
    # 2.18 TB/s alone, 3.03 to 2.58 ms a base step, 635,299 to 642,720 tokens/s (session 7).
    ln_stages_bwd: int = 1
    ln_deferred_sums_bwd: bool = True
    # The GLU kernels that write their output as float8, row-major and transposed (the FP8
    # MLP, fused/fp8_mlp.py): 32 rows a tile, so each transposed row written is 32 bytes (one
    # memory sector) long.
    glu_fp8_rows: int = 32
    glu_fp8_cols: int = 128
    glu_fp8_warps: int = 4
    glu_fp8_rows_bwd: int = 32
    glu_fp8_cols_bwd: int = 128
    # 8 warps: 0.351 ms against 0.367 at 4 (32,768 x 3,072, H200, session 10).
    glu_fp8_warps_bwd: int = 8
    # `quantize_fp8` (the FP8 ops' x and output cotangent): 0.031 ms a hidden_size-wide
    # tensor in the base step, where XLA's amax-and-cast plus transpose took 0.052 (session 10).
    quantize_rows: int = 64
    quantize_cols: int = 64
    quantize_warps: int = 4

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type not in (bool, "bool") and (value < 1 or value & (value - 1)):
                raise ValueError(f"{f.name}={value} must be a power of two >= 1")


_DEFAULT_BLOCKS = [FusedBlocks()]


def default_blocks() -> FusedBlocks:
    return _DEFAULT_BLOCKS[0]


def set_default_blocks(blocks: FusedBlocks) -> None:
    """The tile sizes every later trace uses (benchmarks/fused_ops.py measures them)."""
    _DEFAULT_BLOCKS[0] = blocks


def parse_blocks(text: str) -> FusedBlocks:
    """'glu_rows=8,ln_rows=4' -> FusedBlocks with those fields changed (unknown fields or
    values that are not ints: a one-line ValueError)."""
    return dataclasses.replace(FusedBlocks(),
                               **parse_field_overrides(text, FusedBlocks, "fused block"))


def _reciprocal(x: jax.Array, fast: bool) -> jax.Array:
    """1 / x in float32; fast: the GPU's approximate reciprocal (1 ulp; the IEEE division
    Triton emits otherwise made the GLU forward ALU-bound, 0.225 vs 0.181 ms on an H200).
    The interpreter (CPU tests) has no inline PTX and divides."""
    if not fast:
        return 1.0 / x
    return plgpu.elementwise_inline_asm(
        "rcp.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _erf_and_gaussian(x: jax.Array, fast: bool) -> tuple[jax.Array, jax.Array]:
    """(erf(x), exp(-x^2)) in float32; the second term is reused by GELU's derivative."""
    t = _reciprocal(1.0 + _ERF_P * jnp.abs(x), fast)
    poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
    gaussian = jnp.exp2(-x * x * _LOG2_E)
    magnitude = 1.0 - poly * gaussian
    return jnp.where(x < 0, -magnitude, magnitude), gaussian


def _gelu_parts(a: jax.Array, fast: bool) -> tuple[jax.Array, jax.Array]:
    """(gelu(a), gelu'(a)) of exact (erf) GELU, float32 (fast: see _reciprocal)."""
    erf, gaussian = _erf_and_gaussian(a * _SQRT_HALF, fast)
    cdf = 0.5 * (1.0 + erf)
    return a * cdf, cdf + a * (_INV_SQRT_2PI * gaussian)


def _keep(seed_ref, row0, rows: int, col0, cols: int, rate: float) -> jax.Array:
    row = (row0 + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)).astype(jnp.uint32)
    col = (col0 + lax.broadcasted_iota(jnp.int32, (1, cols), 1)).astype(jnp.uint32)
    return keep_from_position(row, col, seed_ref[0], seed_ref[1], rate)


def _largest_pow2_divisor(n: int, cap: int) -> int:
    size = 1
    while size < cap and n % (size * 2) == 0:
        size *= 2
    return size


def _chunk(width: int) -> int:
    """The power-of-two column chunk (<= 256) the kernels load a row in; 0 if none fits."""
    chunk = _largest_pow2_divisor(width, 256)
    return chunk if chunk >= 16 else 0


def supports(width: int) -> bool:
    """Whether the kernels take rows of this width (a multiple of 16)."""
    return _chunk(width) > 0


# ----------------------------------------------------------------------------- GLU

def _dropped_tile(seed_ref, t: jax.Array, rate: float) -> jax.Array:
    """Hash dropout of this program's [rows, cols] tile t (float32), scaled by 1 / (1 - rate)."""
    if rate == 0.0:
        return t
    rows, cols = t.shape
    keep = _keep(seed_ref, pl.program_id(0) * rows, rows, pl.program_id(1) * cols, cols, rate)
    return jnp.where(keep, t * (1.0 / (1.0 - rate)), 0.0)


def _glu_tile(seed_ref, h_ref, rate: float, fast: bool) -> jax.Array:
    """dropout(gelu(a) * b) of this program's tile of h = [a | b], float32."""
    a = h_ref[:, 0, :].astype(jnp.float32)
    b = h_ref[:, 1, :].astype(jnp.float32)
    return _dropped_tile(seed_ref, _gelu_parts(a, fast)[0] * b, rate)


def _glu_grad_tile(seed_ref, h_ref, g_ref, rate: float, fast: bool):
    """(d(a), d(b)) of this program's tile for the cotangent tile g, float32."""
    a = h_ref[:, 0, :].astype(jnp.float32)
    b = h_ref[:, 1, :].astype(jnp.float32)
    g = _dropped_tile(seed_ref, g_ref[...].astype(jnp.float32), rate)
    gelu, dgelu = _gelu_parts(a, fast)
    return g * b * dgelu, g * gelu


def _glu_fwd_kernel(seed_ref, h_ref, o_ref, *, rate: float, fast: bool):
    o_ref[...] = _glu_tile(seed_ref, h_ref, rate, fast).astype(o_ref.dtype)


def _glu_bwd_kernel(seed_ref, h_ref, g_ref, dh_ref, *, rate: float, fast: bool):
    for slot, d in enumerate(_glu_grad_tile(seed_ref, h_ref, g_ref, rate, fast)):
        dh_ref[:, slot, :] = d.astype(dh_ref.dtype)


def _glu_call(kernel, out_shape, rows: int, width: int, tiles: tuple[int, int, int],
              interpret: bool, extra_in: int, name: str):
    block_rows, block_cols, warps = tiles
    br = _largest_pow2_divisor(rows, block_rows)
    bc = _largest_pow2_divisor(width, block_cols)
    h_spec = pl.BlockSpec((br, 2, bc), lambda i, j: (i, 0, j))
    g_spec = pl.BlockSpec((br, bc), lambda i, j: (i, j))
    seed_spec = pl.BlockSpec((2,), lambda i, j: (0,))
    out_spec = h_spec if len(out_shape.shape) == 3 else g_spec
    return pl.pallas_call(
        kernel, grid=(rows // br, width // bc),
        in_specs=[seed_spec, h_spec] + [g_spec] * extra_in, out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret, name=name)


def _glu_forward(h, seed, rate, blocks, interpret):
    rows, width = h.shape[0], h.shape[1] // 2
    call = _glu_call(functools.partial(_glu_fwd_kernel, rate=rate, fast=not interpret),
                     jax.ShapeDtypeStruct((rows, width), h.dtype), rows, width,
                     (blocks.glu_rows, blocks.glu_cols, blocks.glu_warps), interpret, 0,
                     "glu_dropout_fwd")
    return call(seed, h.reshape(rows, 2, width))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _glu(h, seed, rate, blocks, interpret):
    return _glu_forward(h, seed, rate, blocks, interpret)


def _glu_fwd(h, seed, rate, blocks, interpret):
    return _glu_forward(h, seed, rate, blocks, interpret), (h, seed)


def _glu_bwd(rate, blocks, interpret, residuals, g):
    h, seed = residuals
    rows, width = g.shape
    call = _glu_call(functools.partial(_glu_bwd_kernel, rate=rate, fast=not interpret),
                     jax.ShapeDtypeStruct((rows, 2, width), h.dtype), rows, width,
                     (blocks.glu_rows_bwd, blocks.glu_cols_bwd, blocks.glu_warps_bwd), interpret,
                     1, "glu_dropout_bwd")
    return call(seed, h.reshape(rows, 2, width), g).reshape(h.shape), None


_glu.defvjp(_glu_fwd, _glu_bwd)


def glu_dropout(h: jax.Array, seed: jax.Array, rate: float, interpret: bool = False,
                blocks: Optional[FusedBlocks] = None) -> jax.Array:
    """dropout(gelu(a) * b) for h = [a | b] along the last axis; output in h's dtype.

    `seed` is the uint32[2] of `hash_dropout`; rate 0 means no dropout.
    """
    width = h.shape[-1] // 2
    flat = h.reshape(-1, 2 * width)
    out = _glu(flat, seed.astype(jnp.uint32), float(rate), blocks or default_blocks(),
               interpret)
    return out.reshape(h.shape[:-1] + (width,))


# ----------------------------------------------------------------------------- GLU, float8 out

def _tile_amax(*tiles: jax.Array) -> jax.Array:
    """max |t| over every element of the tiles, as a [1, 1] float32 tile: one reduction of
    their elementwise max (one per tile made the float8 GLU backward 0.006 ms slower)."""
    return jnp.max(functools.reduce(jnp.maximum, [jnp.abs(t) for t in tiles]), axis=(0, 1),
                   keepdims=True)


# The float8 GLU kernels' `leave_out` (static, empty in the model): outputs left unwritten,
# for benchmarks/fp8_mlp.py --ablate, which times what each output costs in these very kernels.
ABLATABLE_OUTPUTS = ("transposed", "amax")


def _glu_fp8_fwd_kernel(seed_ref, inv_ref, h_ref, q_ref, qt_ref, amax_ref, *, rate: float,
                        fast: bool, fp8_dtype, leave_out: tuple = ()):
    y = _glu_tile(seed_ref, h_ref, rate, fast)
    q = to_fp8(y, inv_ref[0], fp8_dtype)
    q_ref[...] = q
    if "transposed" not in leave_out:
        qt_ref[...] = q.T
    if "amax" not in leave_out:
        amax_ref[...] = _tile_amax(y)


def _glu_fp8_bwd_kernel(seed_ref, inv_ref, h_ref, g_ref, q_ref, qt_ref, amax_ref, *,
                        rate: float, fast: bool, fp8_dtype, leave_out: tuple = ()):
    da, db = _glu_grad_tile(seed_ref, h_ref, g_ref, rate, fast)
    for slot, d in enumerate((da, db)):
        q = to_fp8(d, inv_ref[0], fp8_dtype)
        q_ref[:, slot, :] = q
        if "transposed" not in leave_out:
            qt_ref[slot] = q.T
    if "amax" not in leave_out:
        amax_ref[...] = _tile_amax(da, db)


def _glu_fp8_call(kernel, rows: int, width: int, tiles: tuple[int, int, int], fp8_dtype,
                  backward: bool, interpret: bool, name: str):
    """pallas_call of a float8-out GLU kernel over [rows, width] tiles: outputs q (the
    forward's [rows, width], the backward's [rows, 2, width]), q transposed ([width, rows] /
    [2, width, rows]) and one amax per tile."""
    block_rows, block_cols, warps = tiles
    br = _largest_pow2_divisor(rows, block_rows)
    bc = _largest_pow2_divisor(width, block_cols)
    grid = (rows // br, width // bc)
    h_spec = pl.BlockSpec((br, 2, bc), lambda i, j: (i, 0, j))
    g_spec = pl.BlockSpec((br, bc), lambda i, j: (i, j))
    if backward:
        q_spec, q_shape = h_spec, (rows, 2, width)
        qt_spec, qt_shape = pl.BlockSpec((2, bc, br), lambda i, j: (0, j, i)), (2, width, rows)
    else:
        q_spec, q_shape = g_spec, (rows, width)
        qt_spec, qt_shape = pl.BlockSpec((bc, br), lambda i, j: (j, i)), (width, rows)
    scalar_spec = pl.BlockSpec((1,), lambda i, j: (0,))
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[pl.BlockSpec((2,), lambda i, j: (0,)), scalar_spec, h_spec]
        + [g_spec] * backward,
        out_specs=[q_spec, qt_spec, pl.BlockSpec((1, 1), lambda i, j: (i, j))],
        out_shape=[jax.ShapeDtypeStruct(q_shape, fp8_dtype),
                   jax.ShapeDtypeStruct(qt_shape, fp8_dtype),
                   jax.ShapeDtypeStruct(grid, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret, name=name)


def glu_dropout_fp8(h: jax.Array, seed: jax.Array, rate: float, inv_scale: jax.Array,
                    fp8_dtype, interpret: bool = False,
                    blocks: Optional[FusedBlocks] = None):
    """dropout(gelu(a) * b) for h = [a | b] ([rows, 2 * width]), times inv_scale, as
    fp8_dtype: (q [rows, width], q transposed [width, rows], the float32 amax of the product
    before quantising). One pass over h; the transposed copy is the contraction-major operand
    of the next GEMM's weight gradient."""
    blocks = blocks or default_blocks()
    rows, width = h.shape[0], h.shape[1] // 2
    call = _glu_fp8_call(
        functools.partial(_glu_fp8_fwd_kernel, rate=float(rate), fast=not interpret,
                          fp8_dtype=fp8_dtype), rows, width,
        (blocks.glu_fp8_rows, blocks.glu_fp8_cols, blocks.glu_fp8_warps), fp8_dtype, False,
        interpret, "glu_dropout_fp8_fwd")
    q, qt, amax = call(seed.astype(jnp.uint32), inv_scale.astype(jnp.float32).reshape(1),
                       h.reshape(rows, 2, width))
    return q, qt, jnp.max(amax)


def glu_dropout_fp8_grad(h: jax.Array, g: jax.Array, seed: jax.Array, rate: float,
                         inv_scale: jax.Array, fp8_dtype, interpret: bool = False,
                         blocks: Optional[FusedBlocks] = None):
    """The gradient of glu_dropout at h for the cotangent g ([rows, width]), times inv_scale,
    as fp8_dtype: (q [rows, 2 * width], q transposed [2 * width, rows], float32 amax)."""
    blocks = blocks or default_blocks()
    rows, width = g.shape
    call = _glu_fp8_call(
        functools.partial(_glu_fp8_bwd_kernel, rate=float(rate), fast=not interpret,
                          fp8_dtype=fp8_dtype), rows, width,
        (blocks.glu_fp8_rows_bwd, blocks.glu_fp8_cols_bwd, blocks.glu_fp8_warps_bwd),
        fp8_dtype, True, interpret, "glu_dropout_fp8_bwd")
    q, qt, amax = call(seed.astype(jnp.uint32), inv_scale.astype(jnp.float32).reshape(1),
                       h.reshape(rows, 2, width), g)
    return q.reshape(rows, 2 * width), qt.reshape(2 * width, rows), jnp.max(amax)


def _quantize_kernel(inv_ref, x_ref, q_ref, qt_ref, amax_ref, *, fp8_dtype):
    x = x_ref[...].astype(jnp.float32)
    q = to_fp8(x, inv_ref[0], fp8_dtype)
    q_ref[...] = q
    qt_ref[...] = q.T
    amax_ref[...] = _tile_amax(x)


def quantize_fp8(x: jax.Array, inv_scale: jax.Array, fp8_dtype, interpret: bool = False,
                 blocks: Optional[FusedBlocks] = None):
    """x [rows, width] times inv_scale as fp8_dtype: (q, q transposed [width, rows], the
    float32 amax of x), in one pass over x. XLA takes two (amax + cast, then a transpose)."""
    blocks = blocks or default_blocks()
    rows, width = x.shape
    br = _largest_pow2_divisor(rows, blocks.quantize_rows)
    bc = _largest_pow2_divisor(width, blocks.quantize_cols)
    grid = (rows // br, width // bc)
    call = pl.pallas_call(
        functools.partial(_quantize_kernel, fp8_dtype=fp8_dtype), grid=grid,
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)),
                  pl.BlockSpec((br, bc), lambda i, j: (i, j))],
        out_specs=[pl.BlockSpec((br, bc), lambda i, j: (i, j)),
                   pl.BlockSpec((bc, br), lambda i, j: (j, i)),
                   pl.BlockSpec((1, 1), lambda i, j: (i, j))],
        out_shape=[jax.ShapeDtypeStruct((rows, width), fp8_dtype),
                   jax.ShapeDtypeStruct((width, rows), fp8_dtype),
                   jax.ShapeDtypeStruct(grid, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.quantize_warps, num_stages=1),
        interpret=interpret, name="quantize_fp8")
    q, qt, amax = call(inv_scale.astype(jnp.float32).reshape(1), x)
    return q, qt, jnp.max(amax)


# ----------------------------------------------------------------------------- LayerNorm

def _row_chunks(ref, rows, chunk: int):
    """The float32 column chunks of ref[rows] (rows: a slice or pl.ds of the block)."""
    return [ref[rows, c * chunk:(c + 1) * chunk].astype(jnp.float32)
            for c in range(ref.shape[1] // chunk)]


def _vector_chunks(ref, chunk: int):
    return [ref[c * chunk:(c + 1) * chunk].astype(jnp.float32)[None, :]
            for c in range(ref.shape[0] // chunk)]


def _dropped_sum(seed_ref, x_ref, xb_ref, r_ref, rows, row0, count: int, chunk: int,
                 rate: float):
    """Chunks of dropout(x + x_bias) + residual for block rows `rows` (`count` of them,
    global row number of the first: row0), float32."""
    zs = []
    for c, (x, xb, r) in enumerate(zip(_row_chunks(x_ref, rows, chunk),
                                       _vector_chunks(xb_ref, chunk),
                                       _row_chunks(r_ref, rows, chunk))):
        x = x + xb
        if rate > 0.0:
            keep = _keep(seed_ref, row0, count, c * chunk, chunk, rate)
            x = jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0)
        zs.append(x + r)
    return zs


def _ln_fwd_kernel(seed_ref, x_ref, xb_ref, r_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref, *,
                   rate: float, eps: float, chunk: int):
    rows, width = x_ref.shape
    zs = _dropped_sum(seed_ref, x_ref, xb_ref, r_ref, slice(None), pl.program_id(0) * rows,
                      rows, chunk, rate)
    mean = sum(jnp.sum(z, axis=1) for z in zs) / width
    var = sum(jnp.sum(jnp.square(z - mean[:, None]), axis=1) for z in zs) / width
    rstd = lax.rsqrt(var + eps)
    for c, (z, w, b) in enumerate(zip(zs, _vector_chunks(w_ref, chunk),
                                      _vector_chunks(b_ref, chunk))):
        y = (z - mean[:, None]) * rstd[:, None] * w + b
        y_ref[:, c * chunk:(c + 1) * chunk] = y.astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _ln_bwd_kernel(seed_ref, x_ref, xb_ref, r_ref, w_ref, mean_ref, rstd_ref, *refs,
                   rate: float, chunk: int, step_rows: int, copies: int, deferred: bool):
    """One block of rows, `step_rows` at a time; d(scale), d(bias), d(x_bias) are summed
    over the whole block in registers and written once, as rows 0, 1, 2 of the block's
    [3, width] partial sums (deferred: kept as [step_rows, chunk] tiles, reduced across rows
    at the end). The cotangents of the `copies` outputs (refs[:copies]) are added here, so
    that sum costs no pass of its own."""
    column_sum = (lambda t: t) if deferred else (lambda t: jnp.sum(t, axis=0))
    dy_refs, (dx_ref, dr_ref, partials_ref) = refs[:copies], refs[copies:]
    block, width = x_ref.shape
    ws = _vector_chunks(w_ref, chunk)
    chunks = len(ws)
    block_row0 = pl.program_id(0) * block  # outside the loop: the interpreter needs that

    def step(i, sums):
        first = pl.multiple_of(i * step_rows, step_rows)
        rows = pl.ds(first, step_rows)
        zs = _dropped_sum(seed_ref, x_ref, xb_ref, r_ref, rows, block_row0 + first, step_rows,
                          chunk, rate)
        mean, rstd = mean_ref[rows][:, None], rstd_ref[rows][:, None]
        xhats = [(z - mean) * rstd for z in zs]
        dys = _row_chunks(dy_refs[0], rows, chunk)
        for more in dy_refs[1:]:
            dys = [dy + extra for dy, extra in zip(dys, _row_chunks(more, rows, chunk))]
        gs = [dy * w for dy, w in zip(dys, ws)]
        mean_g = sum(jnp.sum(g, axis=1) for g in gs)[:, None] / width
        mean_gx = sum(jnp.sum(g * xh, axis=1) for g, xh in zip(gs, xhats))[:, None] / width
        dw, db, dxb = list(sums[:chunks]), list(sums[chunks:2 * chunks]), list(sums[2 * chunks:])
        for c, (g, xh, dy) in enumerate(zip(gs, xhats, dys)):
            cols = slice(c * chunk, (c + 1) * chunk)
            dz = rstd * (g - mean_g - xh * mean_gx)
            dr_ref[rows, cols] = dz.astype(dr_ref.dtype)
            if rate > 0.0:
                keep = _keep(seed_ref, block_row0 + first, step_rows, c * chunk, chunk, rate)
                dz = jnp.where(keep, dz * (1.0 / (1.0 - rate)), 0.0)
            dx_ref[rows, cols] = dz.astype(dx_ref.dtype)
            dw[c] = dw[c] + column_sum(dy * xh)
            db[c] = db[c] + column_sum(dy)
            dxb[c] = dxb[c] + column_sum(dz)
        return tuple(dw + db + dxb)

    shape = (step_rows, chunk) if deferred else (chunk,)
    zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in range(3 * chunks))
    sums = lax.fori_loop(0, block // step_rows, step, zeros)
    if deferred:
        sums = tuple(jnp.sum(t, axis=0) for t in sums)
    for c in range(chunks):
        cols = slice(c * chunk, (c + 1) * chunk)
        for row in range(3):  # d(scale), d(bias), d(x_bias)
            partials_ref[row, cols] = sums[row * chunks + c]


def _ln_specs(rows: int, width: int, block_rows: int):
    br = _largest_pow2_divisor(rows, block_rows)
    return (br, pl.BlockSpec((br, width), lambda i: (i, 0)),
            pl.BlockSpec((width,), lambda i: (0,)), pl.BlockSpec((br,), lambda i: (i,)))


def _ln_forward(x, x_bias, residual, scale, bias, seed, rate, eps, blocks, interpret):
    rows, width = x.shape
    br, row_spec, vec_spec, stat_spec = _ln_specs(rows, width, blocks.ln_rows)
    return pl.pallas_call(
        functools.partial(_ln_fwd_kernel, rate=rate, eps=eps, chunk=_chunk(width)),
        grid=(rows // br,),
        in_specs=[pl.BlockSpec((2,), lambda i: (0,)), row_spec, vec_spec, row_spec, vec_spec,
                  vec_spec],
        out_specs=[row_spec, stat_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((rows,), jnp.float32),
                   jax.ShapeDtypeStruct((rows,), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.ln_warps, num_stages=1),
        interpret=interpret, name="dropout_add_layernorm_fwd",
    )(seed, x, x_bias, residual, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _ln(x, x_bias, residual, scale, bias, seed, rate, eps, blocks, interpret, copies):
    y = _ln_forward(x, x_bias, residual, scale, bias, seed, rate, eps, blocks, interpret)[0]
    return (y,) * copies


def _ln_fwd(x, x_bias, residual, scale, bias, seed, rate, eps, blocks, interpret, copies):
    y, mean, rstd = _ln_forward(x, x_bias, residual, scale, bias, seed, rate, eps, blocks,
                                interpret)
    return (y,) * copies, (x, x_bias, residual, scale, bias, seed, mean, rstd)


def _ln_bwd(rate, eps, blocks, interpret, copies, residuals, dys):
    x, x_bias, residual, scale, bias, seed, mean, rstd = residuals
    rows, width = x.shape
    br, row_spec, vec_spec, stat_spec = _ln_specs(rows, width, blocks.ln_block_rows_bwd)
    step_rows = min(blocks.ln_rows_bwd, br)
    # One [3, width] row of partial sums per block, so one reduction after the kernel sums
    # all three (three arrays took three reduction kernels).
    partial_spec = pl.BlockSpec((None, 3, width), lambda i: (i, 0, 0))
    groups = rows // br
    dx, dr, partials = pl.pallas_call(
        functools.partial(_ln_bwd_kernel, rate=rate, chunk=_chunk(width),
                          step_rows=step_rows, copies=copies,
                          deferred=blocks.ln_deferred_sums_bwd),
        grid=(groups,),
        in_specs=[pl.BlockSpec((2,), lambda i: (0,)), row_spec, vec_spec, row_spec, vec_spec,
                  stat_spec, stat_spec] + [row_spec] * copies,
        out_specs=[row_spec, row_spec, partial_spec],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct(residual.shape, residual.dtype),
                   jax.ShapeDtypeStruct((groups, 3, width), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.ln_warps_bwd,
                                             num_stages=blocks.ln_stages_bwd),
        interpret=interpret, name="dropout_add_layernorm_bwd",
    )(seed, x, x_bias, residual, scale, mean, rstd, *dys)
    d_scale, d_bias, d_x_bias = jnp.sum(partials, axis=0)
    return (dx, d_x_bias.astype(x_bias.dtype), dr, d_scale.astype(scale.dtype),
            d_bias.astype(bias.dtype), None)


_ln.defvjp(_ln_fwd, _ln_bwd)


def dropout_add_layernorm(x: jax.Array, residual: jax.Array, scale: jax.Array, bias: jax.Array,
                          seed: jax.Array, rate: float, eps: float,
                          x_bias: Optional[jax.Array] = None, interpret: bool = False,
                          blocks: Optional[FusedBlocks] = None, copies: int = 1):
    """LayerNorm(dropout(x + x_bias) + residual) over the last axis, in x's dtype.

    x_bias is the bias of the dense layer that produced x (added here rather than in a
    separate pass over x); statistics are float32. copies = 2 returns the output twice, for
    two consumers (the next matmul and the next residual): the backward kernel then adds
    their two cotangents itself instead of autodiff adding them in a pass of their own."""
    if copies not in (1, 2):
        raise ValueError(f"copies={copies} must be 1 or 2")
    width = x.shape[-1]
    if x_bias is None:
        x_bias = jnp.zeros((width,), jnp.float32)
    ys = _ln(x.reshape(-1, width), x_bias, residual.reshape(-1, width).astype(x.dtype), scale,
             bias, seed.astype(jnp.uint32), float(rate), float(eps), blocks or default_blocks(),
             interpret, copies)
    ys = tuple(y.reshape(x.shape) for y in ys)
    return ys[0] if copies == 1 else ys
