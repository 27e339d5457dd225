"""The jax-triton path: the Triton-language kernels of triton_lang.py called through
`jax_triton.triton_call`, forward and backward, tied together with a custom_vjp.

Registered as implementation="triton" (NVIDIA GPU only). It is an optional extra: this
module imports without Triton, and calling the kernel raises an ImportError naming the
install command when `jax_triton` or a compatible `triton` is missing. Block sizes and
launch settings are the Pallas GPU kernel's (`pallas_gpu.BlockSizes`), so the two can be
compared like for like. Each launch is first described as a `KernelLaunch` (kernel name,
inputs, outputs, grid, constexprs), which `triton_call` runs here and which tests can run
in Triton's own interpreter on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mosaicbert_jax.attention.block_sparsity import (fully_visible_block_ranges, pad_sequence,
                                                    visible_block_ranges)
from mosaicbert_jax.attention.pallas_gpu import (BlockSizes,
                                                 default_block_sizes_for_head_dim)

INSTALL_HINT = ("implementation='triton' needs a CUDA GPU, jax-triton and a Triton it supports "
                "(jax-triton 0.3.1 pairs with triton 3.6; 0.4 needs triton >= 3.7 and JAX >= "
                "0.11); install them with: pip install 'mosaicbert-jax[triton]'")
_PAD_QUERY_SEGMENT = int(jnp.iinfo(jnp.int32).min)


def triton_language():
    """The module of Triton-language kernels; ImportError with the install hint without Triton."""
    try:
        return importlib.import_module("mosaicbert_jax.attention.triton_lang")
    except Exception as err:  # triton missing, or too old for the kernels' language features
        raise ImportError(f"{INSTALL_HINT} (importing triton failed: "
                          f"{type(err).__name__}: {err})") from err


def jax_triton():
    """The jax_triton module; ImportError with the install hint when it cannot be used."""
    try:
        return importlib.import_module("jax_triton")
    except Exception as err:  # jax_triton's import also fails on a jaxlib without CUDA
        raise ImportError(f"{INSTALL_HINT} (importing jax_triton failed: "
                          f"{type(err).__name__}: {err})") from err


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: inputs then outputs are the kernel's pointer arguments, in order."""
    kernel: str                       # attribute of triton_lang
    inputs: tuple[jax.Array, ...]
    out_shapes: tuple[jax.ShapeDtypeStruct, ...]
    grid: tuple[int, int, int]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


def _plan(segment_ids, block_rows: int, block_cols: int) -> jax.Array:
    """int32 [batch, 4, n_row_blocks]: lo, hi, start, end (see block_sparsity.py)."""
    lo, hi = visible_block_ranges(segment_ids, block_rows, block_cols)
    start, end = fully_visible_block_ranges(segment_ids, block_rows, block_cols, hi)
    return jnp.stack([lo, hi, start, end], axis=1)


def _query_segments(segment_ids):
    return jnp.where(segment_ids == 0, _PAD_QUERY_SEGMENT, segment_ids)


def _constexprs(q, scale, block_q, block_k, n_rows, sizes: BlockSizes) -> dict[str, Any]:
    _, seq, heads, head_dim = q.shape
    return dict(scale=float(scale), SEQ=seq, HEADS=heads, HEAD_DIM=head_dim, BLOCK_Q=block_q,
                BLOCK_K=block_k, N_ROWS=n_rows, SPLIT=sizes.unmasked_interior,
                # fp32 inputs get true fp32 products (no TF32), as the reference computes.
                PRECISION="ieee" if q.dtype == jnp.float32 else None)


def forward_launch(q, k, v, segment_ids, slopes, scale, sizes: BlockSizes) -> KernelLaunch:
    batch, seq, heads, _ = q.shape
    bq, bk = sizes.block_q, sizes.block_k
    return KernelLaunch(
        "forward_kernel",
        (q, k, v, _query_segments(segment_ids), segment_ids, slopes, _plan(segment_ids, bq, bk)),
        (jax.ShapeDtypeStruct(q.shape, q.dtype),
         jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)),
        (seq // bq, batch, heads), _constexprs(q, scale, bq, bk, seq // bq, sizes),
        sizes.num_warps, sizes.num_stages)


def backward_launches(q, k, v, segment_ids, slopes, out, lse, d_out, scale,
                      sizes: BlockSizes) -> tuple[KernelLaunch, KernelLaunch]:
    """The dK/dV launch (rows are key blocks: the plan transposed) and the dQ launch."""
    batch, seq, heads, _ = q.shape
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), d_out.astype(jnp.float32))
    q_segments = _query_segments(segment_ids)
    bq, bk = sizes.block_q_dkv, sizes.block_k_dkv
    dkdv = KernelLaunch(
        "dkdv_kernel",
        (q, k, v, d_out, q_segments, segment_ids, slopes, _plan(segment_ids, bk, bq), lse,
         delta),
        (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        (seq // bk, batch, heads), _constexprs(q, scale, bq, bk, seq // bk, sizes),
        sizes.num_warps_bwd, sizes.num_stages_bwd)
    bq, bk = sizes.block_q_dq, sizes.block_k_dq
    dq = KernelLaunch(
        "dq_kernel",
        (q, k, v, d_out, q_segments, segment_ids, slopes, _plan(segment_ids, bq, bk), lse,
         delta),
        (jax.ShapeDtypeStruct(q.shape, q.dtype),),
        (seq // bq, batch, heads), _constexprs(q, scale, bq, bk, seq // bq, sizes),
        sizes.num_warps_bwd, sizes.num_stages_bwd)
    return dkdv, dq


def _run(launch: KernelLaunch) -> tuple[jax.Array, ...]:
    """Runs a launch through jax_triton.triton_call (compiled for the local GPU)."""
    outs = jax_triton().triton_call(
        *launch.inputs,
        kernel=getattr(triton_language(), launch.kernel),
        out_shape=list(launch.out_shapes),
        grid=launch.grid,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        name=f"alibi_flash_{launch.kernel}",
        **launch.constexprs)
    return tuple(outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, segment_ids, slopes, scale, sizes):
    return _run(forward_launch(q, k, v, segment_ids, slopes, scale, sizes))[0]


def _flash_fwd(q, k, v, segment_ids, slopes, scale, sizes):
    out, lse = _run(forward_launch(q, k, v, segment_ids, slopes, scale, sizes))
    return out, (q, k, v, segment_ids, slopes, out, lse)


def _flash_bwd(scale, sizes, residuals, d_out):
    q, k, v, segment_ids, slopes, out, lse = residuals
    dkdv, dq = backward_launches(q, k, v, segment_ids, slopes, out, lse, d_out, scale, sizes)
    dk, dv = _run(dkdv)
    (dq,) = _run(dq)
    # Segment ids are integers and ALiBi slopes are constants of the model: no cotangent.
    return dq, dk, dv, None, jnp.zeros_like(slopes)


_flash.defvjp(_flash_fwd, _flash_bwd)


def prepare_inputs(q, k, v, segment_ids, block_sizes: Optional[BlockSizes]):
    """Checks inputs and pads the sequence (segment 0) to a multiple of the largest block."""
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim={head_dim} is not supported by the Triton kernel: it must "
                         "be a power of two >= 16; use implementation='xla' for other sizes")
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"dtype {q.dtype} is not supported; use bfloat16, float16 or float32")
    sizes = block_sizes or default_block_sizes_for_head_dim(q.shape[1], head_dim)
    (q, k, v), segment_ids = pad_sequence((q, k, v), segment_ids, max(sizes.blocks()))
    return q, k, v, segment_ids, sizes


def triton_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                           slopes: jax.Array, scale: float, *,
                           block_sizes: Optional[BlockSizes] = None) -> jax.Array:
    """ALiBi + segment-masked attention on [batch, seq, heads, head_dim] via jax-triton.

    Same contract as `pallas_gpu.flash_attention`; needs a CUDA GPU, jax-triton and Triton.
    """
    triton_language()
    jax_triton()
    if jax.default_backend() != "gpu":
        raise ValueError(f"implementation='triton' runs on GPUs only (backend is "
                         f"{jax.default_backend()!r}); use 'pallas_interpret' or 'xla' here")
    seq = q.shape[1]
    q, k, v, segment_ids, sizes = prepare_inputs(q, k, v, segment_ids, block_sizes)
    out = _flash(q, k, v, segment_ids, jnp.asarray(slopes, jnp.float32), float(scale), sizes)
    return out[:, :seq]


def triton_attention(q, k, v, segment_ids, slopes, scale):
    """Registered as implementation 'triton'."""
    return triton_flash_attention(q, k, v, segment_ids, slopes, scale)
