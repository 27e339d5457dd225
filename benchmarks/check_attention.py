"""Checks a compiled attention kernel against the float64 reference on fresh random packed layouts.

  PYTHONPATH=.:tests python benchmarks/check_attention.py --implementation pallas

Documents of 1 token up to the row, trailing padding, all-padding rows (tests/attention_cases.py
draws them); forward and gradients, fp32 (dots may run as TF32) and bf16. Prints one line per
case and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from attention_cases import check_random_packed_layouts
from mosaicbert_jax.attention import attention

TOLERANCES = {"float32": (2e-3, 5e-3), "bfloat16": (2e-2, 3e-2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementation", default="pallas")
    parser.add_argument("--seqs", default="128,200,512,1024")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--draws", type=int, default=4)
    args = parser.parse_args()
    impl = args.implementation
    fn = lambda q, k, v, s, slopes, scale: attention(q, k, v, s, slopes, impl, scale=scale)
    for seq in map(int, args.seqs.split(",")):
        for head_dim in map(int, args.head_dims.split(",")):
            for dtype_name, (fwd_tol, grad_tol) in TOLERANCES.items():
                seed = check_random_packed_layouts(
                    fn, seq, draws=args.draws, batch=4, heads=4, head_dim=head_dim,
                    dtype=getattr(jnp, dtype_name), forward_tolerance=fwd_tol,
                    gradient_tolerance=grad_tol, name=impl)
                print(f"{impl} seq {seq} head_dim {head_dim} {dtype_name}: ok (seed {seed})",
                      flush=True)
    print("all layouts ok")


if __name__ == "__main__":
    sys.exit(main())
