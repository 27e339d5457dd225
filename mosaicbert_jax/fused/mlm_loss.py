"""The MLM loss over the decoder's 30528-wide logits: sums of cross-entropy, correct
predictions and valid slots, and the gradient of the loss for the decoder's backward GEMMs.

`masked_lm_sums(logits, labels, weights, bias, implementation)`, logits [..., vocab] in the
compute dtype and the decoder bias apart (None: already added). Two implementations:
- "xla": the plain composition (`reference_sums`). Its passes over the logits are an argmax
  (which finds the row max, the logsumexp's shift), a sum of exponentials, and in the
  backward one fused pass writing softmax - one_hot (with the bias-gradient reduction).
- "pallas" (GPU; "pallas_interpret" runs it in the Pallas interpreter): one kernel that walks
  a few rows a program (RowBlocks) and writes, already in the forward, the gradient
  (softmax - one_hot) * weight in the logits' dtype, plus each row's cross-entropy and
  prediction. The backward only scales it by the loss's cotangent (XLA
  drops the product by the constant 1 that jax.grad seeds) and sums it for the bias.
  The gradient is the residual in place of the logits, so nothing more is stored.
"auto" is xla. On an H200 (benchmarks/check_mlm_loss.py, 9728 x 30528 bf16 logits, forward +
backward of the loss alone) XLA's passes took 1.06-1.07 ms (2026-12-03 and -04). The kernel
holding a whole row in registers (RowBlocks(chunk=0, num_warps=16): about 240 KB of float32,
one program per SM, too few loads in flight) took 1.30 ms; walking rows in chunks, the
fastest of seven variants, 2 rows a program in 2048-column chunks with 4 warps (the default
RowBlocks()), 0.95 ms. In the FP8 train step that 0.12 ms did not show: 41.91 ms a step with
the kernel against 41.78 with XLA (spreads 0.79 and 0.55 ms; benchmarks/RESULTS.md, session
18), so XLA stays the default and the kernel is opt-in (mlm_loss_implementation="pallas").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mosaicbert_jax.config import FUSED_IMPLEMENTATIONS as IMPLEMENTATIONS
from mosaicbert_jax.field_overrides import parse_field_overrides

MAX_VOCAB = 1 << 16


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """How the Pallas kernel walks the logits. chunk 0: one program per row, the whole row in
    registers as float32 (16 warps: about 60 values a thread at 30528), read once. chunk > 0 (a
    power of two): `rows` rows a program (capped at the largest power of two dividing the row
    count), walked `chunk` columns at a time, twice: an online max / logsumexp / argmax, then
    the gradient (the second read may come from L2). The default is the fastest measured
    (module docstring)."""
    rows: int = 2
    chunk: int = 2048
    num_warps: int = 4

    def __post_init__(self):
        for name in ("rows", "num_warps") + (("chunk",) if self.chunk else ()):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"RowBlocks.{name}={value} must be a power of two")
        if self.chunk and self.chunk < 16:
            raise ValueError(f"RowBlocks.chunk={self.chunk} must be 0 or a power of two >= 16")


_DEFAULT_BLOCKS = [RowBlocks()]


def default_blocks() -> RowBlocks:
    return _DEFAULT_BLOCKS[0]


def set_default_blocks(blocks: RowBlocks) -> None:
    """The RowBlocks every later trace uses where none is passed (benchmarks/check_mlm_loss.py
    measures them; the benchmarks' --mlm-loss-blocks flag sets them for a whole train step)."""
    _DEFAULT_BLOCKS[0] = blocks


def parse_blocks(text: str) -> RowBlocks:
    """'rows=4,chunk=2048' -> RowBlocks with those fields changed (unknown fields, values that
    are not ints or not powers of two: a one-line ValueError)."""
    return RowBlocks(**parse_field_overrides(text, RowBlocks, "RowBlocks override"))


def supports(vocab: int) -> bool:
    """Whether the Pallas kernel takes this vocab size: a multiple of 16 (the row splits into
    power-of-two chunks of at least 16) up to MAX_VOCAB (the row must fit in registers)."""
    return 0 < vocab <= MAX_VOCAB and vocab % 16 == 0


def resolve(implementation: str, vocab: int) -> str:
    """The implementation that runs: 'auto' becomes xla (the faster, module docstring);
    others are checked."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"mlm_loss_implementation={implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}")
    if implementation in ("auto", "xla"):
        return "xla"
    if not supports(vocab):
        raise ValueError(f"mlm_loss_implementation={implementation!r} needs a vocab size that "
                         f"is a multiple of 16 and at most {MAX_VOCAB}; got {vocab}; use 'xla'")
    return implementation


def masked_lm_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                   bias: Optional[jax.Array] = None, implementation: str = "xla",
                   blocks: Optional[RowBlocks] = None) -> dict:
    """{"loss_sum", "correct_sum", "weight_sum"} in float32 for logits [..., vocab] (plus
    bias [vocab], added in float32), labels and weights [...]; implementation as resolve
    gives it ("auto" is resolved here); blocks: the Pallas kernel's (RowBlocks; None: the
    default_blocks())."""
    impl = resolve(implementation, logits.shape[-1])
    labels = labels.astype(jnp.int32)
    weights = weights.astype(jnp.float32)
    if impl == "xla":
        return reference_sums(logits, labels, weights, bias)
    vocab = logits.shape[-1]
    bias = jnp.zeros((vocab,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    loss_sum, correct_sum = _fused_sums(logits.reshape(-1, vocab), bias, labels.reshape(-1),
                                        weights.reshape(-1), impl == "pallas_interpret",
                                        blocks or default_blocks())
    return {"loss_sum": loss_sum, "correct_sum": correct_sum, "weight_sum": jnp.sum(weights)}


# ------------------------------------------------------------------------------------ XLA

@jax.custom_vjp
def _cross_entropy(logits: jax.Array, labels: jax.Array,
                   log_normalizer: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] per row, float32, given the rows' logsumexp."""
    return _cross_entropy_fwd(logits, labels, log_normalizer)[0]


def _cross_entropy_fwd(logits, labels, log_normalizer):
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return log_normalizer - label_logit, (logits, labels, log_normalizer)


def _cross_entropy_bwd(residuals, g):
    # softmax - one_hot(label), written as one elementwise expression of the logits: XLA
    # fuses it with the upcast of the bf16 logits, the bf16 cast for the decoder's backward
    # GEMMs and the decoder-bias reduction into one pass (autodiff's take_along_axis
    # transpose is a scatter into a materialised float32 [tokens, vocab] buffer instead).
    logits, labels, log_normalizer = residuals
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    one_hot = (vocab == labels[..., None]).astype(jnp.float32)
    d_logits = (jnp.exp(logits - log_normalizer[..., None]) - one_hot) * g[..., None]
    return d_logits, None, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def reference_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                   bias: Optional[jax.Array] = None) -> dict:
    """The plain composition. The logsumexp is shifted by the logit at the argmax, which is
    the row max, so one pass over the logits finds both the prediction and the shift and a
    second sums the exponentials (optax's loss plus a separate argmax read them three times;
    an online logsumexp folded into the argmax pass measured slower on an H200, 0.87 vs
    0.67 ms). The gradient is one fused pass (_cross_entropy)."""
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    stopped = jax.lax.stop_gradient(logits)
    predicted = jnp.argmax(stopped, axis=-1)
    shift = jnp.take_along_axis(stopped, predicted[..., None], axis=-1)
    log_normalizer = jnp.log(jnp.sum(jnp.exp(stopped - shift), axis=-1)) + shift[..., 0]
    xent = _cross_entropy(logits, labels, log_normalizer)
    correct = (predicted == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(xent * weights), "correct_sum": jnp.sum(correct * weights),
            "weight_sum": jnp.sum(weights)}


# --------------------------------------------------------------------------------- Pallas

def _chunks(vocab: int, start: int = 0) -> list[tuple[int, int]]:
    """(offset, size) of power-of-two pieces covering [start, start + vocab), largest first
    (Triton tensors are powers of two; 30528 = 16384 + 8192 + 4096 + 1024 + 512 + 256 + 64)."""
    pieces, offset = [], start
    for bit in reversed(range(vocab.bit_length())):
        if vocab & (1 << bit):
            pieces.append((offset, 1 << bit))
            offset += 1 << bit
    return pieces


def _row_kernel(labels_ref, weights_ref, logits_ref, bias_ref, grad_ref, xent_ref, pred_ref,
                *, chunks):
    label, weight = labels_ref[0], weights_ref[0]
    xs = [logits_ref[:, o:o + n].astype(jnp.float32) + bias_ref[o:o + n][None, :]
          for o, n in chunks]
    columns = [o + jax.lax.broadcasted_iota(jnp.int32, (1, n), 1) for o, n in chunks]
    row_max = functools.reduce(jnp.maximum, [jnp.max(x) for x in xs])
    vocab = chunks[-1][0] + chunks[-1][1]
    # The first column holding the max, as jnp.argmax picks it.
    predicted = functools.reduce(jnp.minimum, [jnp.min(jnp.where(x == row_max, c, vocab))
                                               for x, c in zip(xs, columns)])
    total = sum(jnp.sum(jnp.exp(x - row_max)) for x in xs)
    log_normalizer = jnp.log(total) + row_max
    label_logit = sum(jnp.sum(jnp.where(c == label, x, 0.0)) for x, c in zip(xs, columns))
    for (o, n), x, c in zip(chunks, xs, columns):
        one_hot = jnp.where(c == label, 1.0, 0.0)
        grad_ref[:, o:o + n] = ((jnp.exp(x - log_normalizer) - one_hot)
                                * weight).astype(grad_ref.dtype)
    xent_ref[...] = jnp.full((1, 1), log_normalizer - label_logit, jnp.float32)
    pred_ref[...] = jnp.full((1, 1), predicted, jnp.int32)


def _chunked_kernel(labels_ref, weights_ref, logits_ref, bias_ref, grad_ref, xent_ref,
                    pred_ref, *, chunk: int):
    from jax.experimental import pallas as pl
    rows, vocab = logits_ref.shape
    labels, weights = labels_ref[...][:, None], weights_ref[...][:, None]
    full = vocab // chunk
    tail = _chunks(vocab - full * chunk, full * chunk)

    def piece(offset, size):
        cols = pl.ds(offset, size)
        x = logits_ref[:, cols].astype(jnp.float32) + bias_ref[cols][None, :]
        return x, offset + jax.lax.broadcasted_iota(jnp.int32, (rows, size), 1)

    def visit(offset, size, carry):  # online max, logsumexp sum, first argmax, label logit
        row_max, total, predicted, label_logit = carry
        x, columns = piece(offset, size)
        piece_max = jnp.max(x, axis=1, keepdims=True)
        first = jnp.min(jnp.where(x == piece_max, columns, vocab), axis=1, keepdims=True)
        new_max = jnp.maximum(row_max, piece_max)
        total = (total * jnp.exp(row_max - new_max)
                 + jnp.sum(jnp.exp(x - new_max), axis=1, keepdims=True))
        predicted = jnp.where(piece_max > row_max, first, predicted)
        label_logit += jnp.sum(jnp.where(columns == labels, x, 0.0), axis=1, keepdims=True)
        return new_max, total, predicted, label_logit

    def write(offset, size, log_normalizer):
        x, columns = piece(offset, size)
        one_hot = jnp.where(columns == labels, 1.0, 0.0)
        grad_ref[:, pl.ds(offset, size)] = ((jnp.exp(x - log_normalizer) - one_hot)
                                            * weights).astype(grad_ref.dtype)

    carry = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
             jnp.full((rows, 1), vocab, jnp.int32), jnp.zeros((rows, 1), jnp.float32))
    if full:  # (a loop body is traced even for zero trips, and a chunk past vocab is not valid)
        carry = jax.lax.fori_loop(0, full, lambda j, c: visit(j * chunk, chunk, c), carry)
    for offset, size in tail:
        carry = visit(offset, size, carry)
    row_max, total, predicted, label_logit = carry
    log_normalizer = jnp.log(total) + row_max

    def write_chunk(j, unused):
        write(j * chunk, chunk, log_normalizer)
        return unused
    if full:
        jax.lax.fori_loop(0, full, write_chunk, 0)
    for offset, size in tail:
        write(offset, size, log_normalizer)
    xent_ref[...] = log_normalizer - label_logit
    pred_ref[...] = predicted


def _row_pass(logits, bias, labels, weights, interpret: bool, blocks: RowBlocks):
    """(gradient [rows, vocab] in logits' dtype, cross-entropy [rows], predictions [rows])."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    from mosaicbert_jax.fused.pallas_gpu import _largest_pow2_divisor
    rows, vocab = logits.shape
    if blocks.chunk:
        block_rows = _largest_pow2_divisor(rows, blocks.rows)
        kernel = functools.partial(_chunked_kernel, chunk=blocks.chunk)
    else:
        block_rows, kernel = 1, functools.partial(_row_kernel, chunks=_chunks(vocab))
    block = lambda i: (i,)
    grad, xent, predicted = pl.pallas_call(
        kernel,
        grid=(rows // block_rows,),
        in_specs=[pl.BlockSpec((block_rows,), block), pl.BlockSpec((block_rows,), block),
                  pl.BlockSpec((block_rows, vocab), lambda i: (i, 0)),
                  pl.BlockSpec((vocab,), lambda i: (0,))],
        out_specs=[pl.BlockSpec((block_rows, vocab), lambda i: (i, 0)),
                   pl.BlockSpec((block_rows, 1), lambda i: (i, 0)),
                   pl.BlockSpec((block_rows, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, vocab), logits.dtype),
                   jax.ShapeDtypeStruct((rows, 1), jnp.float32),
                   jax.ShapeDtypeStruct((rows, 1), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
        interpret=interpret, name="mlm_loss_rows",
    )(labels, weights, logits, bias)
    return grad, xent[:, 0], predicted[:, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_sums(logits, bias, labels, weights, interpret, blocks):
    return _fused_sums_fwd(logits, bias, labels, weights, interpret, blocks)[0]


def _fused_sums_fwd(logits, bias, labels, weights, interpret, blocks):
    grad, xent, predicted = _row_pass(logits, bias, labels, weights, interpret, blocks)
    sums = (jnp.sum(xent * weights),
            jnp.sum(jnp.where(predicted == labels, weights, 0.0)))
    return sums, (grad, xent)


def _fused_sums_bwd(interpret, blocks, residuals, cotangents):
    grad, xent = residuals
    g = cotangents[0]  # correct_sum is a count: its cotangent is unused
    d_logits = grad * g.astype(grad.dtype)
    d_bias = jnp.sum(grad.astype(jnp.float32), axis=0) * g
    return d_logits, d_bias, None, xent * g


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)


__all__ = ["IMPLEMENTATIONS", "RowBlocks", "default_blocks", "masked_lm_sums", "parse_blocks",
           "reference_sums", "resolve", "set_default_blocks", "supports"]
