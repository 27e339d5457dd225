"""Probe: how many small kernels XLA makes of the output scales of FP8 GEMMs, for each way of
writing them (benchmarks/RESULTS.md, session 19). Compiles, on a GPU, `--gemms` FP8 GEMMs whose
x is quantised by fused.quantize_fp8 and whose weight by XLA, each scaled by the product of two
entries of one stacked scale vector (how the train state holds them, fp8.stack_stats), and
prints per way: cuBLASLt FP8 GEMMs, row-slice kernels, other per-GEMM fusions, and whether the
outputs equal the per-GEMM products' bit for bit.

  PYTHONPATH=.:benchmarks python benchmarks/fp8_gemm_scale_probe.py [--gemms 12] [--tokens 16384]

Ways (SCALE_FORMS):
  per_gemm        scale[i] * scale[j] for each GEMM (the FP8 ops before fp8.model_stats);
  vector          one product of two gathers for every GEMM, then products[k] (model_stats);
  vector_f32_out  the same, the GEMM output float32 times the scale, then cast to bf16.
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np

from fused_ops import require_gpu
from mosaicbert_jax import fp8
from mosaicbert_jax.fused import pallas_gpu
from mosaicbert_jax.fused.fp8_dense import gemm

SCALE_FORMS = ("per_gemm", "vector", "vector_f32_out")


def scaled_gemms(form: str, scale: jax.Array, xs: list, ws: list, interpret: bool = False):
    """y_k = FP8(x_k) @ FP8(w_k)^T * scale[2k] * scale[2k + 1] for every k, in bf16, with the
    output scales written as `form` (SCALE_FORMS)."""
    e4m3, count = fp8.FORWARD_DTYPE, len(xs)
    products = scale[0:2 * count:2] * scale[1:2 * count:2]
    outs = []
    for k, (x, w) in enumerate(zip(xs, ws)):
        sx, sw = scale[2 * k], scale[2 * k + 1]
        qx, _, _ = pallas_gpu.quantize_fp8(x, 1.0 / sx, e4m3, interpret=interpret)
        qw = fp8.quantize(w, e4m3, sw)
        if form == "per_gemm":
            y = gemm(qx, qw, sx * sw, jnp.bfloat16)
        elif form == "vector":
            y = gemm(qx, qw, products[k], jnp.bfloat16)
        elif form == "vector_f32_out":
            alpha = products[k].astype(jnp.bfloat16).astype(jnp.float32)
            y = gemm(qx, qw, alpha, jnp.float32).astype(jnp.bfloat16)
        else:
            raise ValueError(f"form {form!r} is not one of {SCALE_FORMS}")
        outs.append(y)
    return outs


def kernel_counts(hlo_text: str) -> dict:
    """Per instruction kind (its name without the numeric suffix), how many the compiled
    HLO's entry computation holds, and its cuBLASLt FP8 GEMMs under "f8_gemm"."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    counts: collections.Counter = collections.Counter()
    for line in entry.split("\n"):
        match = re.match(r"\s*(?:ROOT )?%([a-z_\-]+?)[._]?\d*(?:\.\d+)* = ", line)
        if match:
            counts[match.group(1)] += 1
    counts["f8_gemm"] = entry.count('custom_call_target="__cublas$lt$matmul$f8"')
    return dict(counts)


def draw(gemms: int, tokens: int, rng: np.random.Generator):
    """Fresh random x [tokens, 768] (standard normal) and w [768 + 128 (k % 3), 768] (0.02
    x normal) and a scale vector (x_0, w_0, x_1, ...) at which almost nothing clips (|x| up
    to 5.4 at the smallest x scale, |w| up to 0.13 at the smallest w scale) or falls below
    e4m3's normal range."""
    scale = jnp.asarray(np.stack([rng.uniform(0.012, 0.05, gemms),
                                  rng.uniform(0.0003, 0.005, gemms)], 1).reshape(-1),
                        jnp.float32)
    xs = [jnp.asarray(rng.standard_normal((tokens, 768)), jnp.bfloat16) for _ in range(gemms)]
    ws = [jnp.asarray(rng.standard_normal((768 + 128 * (k % 3), 768)) * 0.02, jnp.float32)
          for k in range(gemms)]
    return scale, xs, ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemms", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    require_gpu(parser)
    from mosaicbert_jax.xla_flags import apply_gpu_defaults
    apply_gpu_defaults()  # the flags the train step compiles with
    scale, xs, ws = draw(args.gemms, args.tokens, np.random.default_rng())
    want = None
    print(f"{args.gemms} FP8 GEMMs of {args.tokens} x 768 on {jax.devices()[0].device_kind}:\n"
          "| scales written as | cuBLASLt FP8 GEMMs | row-slice kernels | fusions | same "
          "values |\n| --- | --- | --- | --- | --- |")
    for form in SCALE_FORMS:
        fn = jax.jit(lambda s, x, w, form=form: scaled_gemms(form, s, x, w))
        counts = kernel_counts(fn.lower(scale, xs, ws).compile().as_text())
        outs = jax.device_get(fn(scale, xs, ws))
        want = outs if want is None else want
        same = all(np.array_equal(a, b) for a, b in zip(outs, want))
        fusions = sum(v for k, v in counts.items() if "fusion" in k or k.startswith("wrapped"))
        print(f"| {form} | {counts['f8_gemm']} | {counts.get('wrapped_slice', 0)} | {fusions} | "
              f"{'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
