"""The --fused-blocks, --attention-blocks and --mlm-loss-blocks flags the benchmarks share:
kernel tile settings applied before anything traces, so a variant is timed inside the whole
train step."""

from __future__ import annotations

import argparse


def add_tile_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fused-blocks", default="",
                        help="fused-kernel tile sizes, e.g. glu_rows=8,ln_rows=4 (see "
                             "benchmarks/fused_ops.py)")
    parser.add_argument("--attention-blocks", default="",
                        help="Pallas attention BlockSizes overrides, e.g. "
                             "one_pass_backward_max_seq=128,num_warps_bwd=8")
    parser.add_argument("--mlm-loss-blocks", default="",
                        help="the MLM loss kernel's RowBlocks (with mlm_loss_implementation="
                             "pallas), e.g. rows=4,chunk=2048,num_warps=8 (see "
                             "benchmarks/check_mlm_loss.py)")


def apply_tile_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sets the kernels' default tiles from the flags; a bad value is a one-line parser error."""
    from mosaicbert_jax.attention import pallas_gpu as attention_kernels
    from mosaicbert_jax.fused import mlm_loss
    from mosaicbert_jax.fused import pallas_gpu as fused_kernels
    try:
        if args.fused_blocks:
            fused_kernels.set_default_blocks(fused_kernels.parse_blocks(args.fused_blocks))
        if args.attention_blocks:
            attention_kernels.set_block_overrides(
                attention_kernels.parse_block_overrides(args.attention_blocks))
        if args.mlm_loss_blocks:
            mlm_loss.set_default_blocks(mlm_loss.parse_blocks(args.mlm_loss_blocks))
    except (ValueError, TypeError) as e:
        parser.error(str(e))
