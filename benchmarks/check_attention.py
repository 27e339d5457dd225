"""Checks a compiled attention kernel against the float64 reference on fresh random packed layouts.

  PYTHONPATH=.:tests python benchmarks/check_attention.py --implementation pallas
  PYTHONPATH=.:tests python benchmarks/check_attention.py --seqs 64,100,128 \
      --attention-blocks one_pass_backward_max_seq=128      # the one-pass backward

Documents of 1 token up to the row, trailing padding, all-padding rows (tests/attention_cases.py
draws them); forward and gradients, fp32 (dots may run as TF32) and bf16. Implementations with
a fused-QKV entry (pallas) are checked through it as well: q, k, v stacked into one
[batch, seq, 3, heads, head_dim] array, read in place, d(qkv) read back slot by slot
(--no-fused-qkv skips it). Prints one line per case and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from attention_cases import check_random_packed_layouts
from kernel_tiles import add_tile_flags, apply_tile_flags
from mosaicbert_jax.attention import (attention, attention_qkv, qkv_implementations,
                                      resolve_implementation)

TOLERANCES = {"float32": (2e-3, 5e-3), "bfloat16": (2e-2, 3e-2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementation", default="pallas")
    parser.add_argument("--seqs", default="128,200,512,1024")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--windows", default="0",
                        help="sliding windows to check, e.g. 0,48 (0 = full attention)")
    parser.add_argument("--no-fused-qkv", action="store_true",
                        help="check only the q, k, v entry, not the fused-QKV one")
    add_tile_flags(parser)   # e.g. --attention-blocks one_pass_backward_max_seq=128
    args = parser.parse_args()
    apply_tile_flags(parser, args)
    impl = args.implementation
    fused = resolve_implementation(impl) in qkv_implementations() and not args.no_fused_qkv
    for window in map(int, args.windows.split(",")):
        entries = {impl: lambda q, k, v, s, slopes, scale, w=window: attention(
            q, k, v, s, slopes, impl, scale=scale, window=w)}
        if fused:
            entries[f"{impl} fused-qkv"] = lambda q, k, v, s, slopes, scale, w=window: (
                attention_qkv(jnp.stack([q, k, v], axis=2), s, slopes, impl, scale=scale,
                              window=w))
        for seq in map(int, args.seqs.split(",")):
            for head_dim in map(int, args.head_dims.split(",")):
                for dtype_name, (fwd_tol, grad_tol) in TOLERANCES.items():
                    for name, fn in entries.items():
                        seed = check_random_packed_layouts(
                            fn, seq, draws=args.draws, batch=4, heads=4, head_dim=head_dim,
                            dtype=getattr(jnp, dtype_name), forward_tolerance=fwd_tol,
                            gradient_tolerance=grad_tol, name=name, window=window)
                        print(f"{name} seq {seq} head_dim {head_dim} {dtype_name} window "
                              f"{window}: ok (seed {seed})", flush=True)
    print("all layouts ok")


if __name__ == "__main__":
    sys.exit(main())
