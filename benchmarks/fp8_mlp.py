"""The FP8 MLP (model.fp8_gemm "mlp", mosaicbert_jax/fused/fp8_mlp.py) beside the bf16 MLP, and
the FP8 QKV projection ("mlp_qkv", fused/fp8_dense.py) beside the bf16 one: check against
float32, then time one layer's MLP and QKV projection, forward and forward + backward.

  PYTHONPATH=. python benchmarks/fp8_mlp.py [--tokens 32768] [--reps 20] [--sweep] [--ablate]

The bf16 MLP is what the model runs by default: x @ W_up, the fused GLU + dropout kernel,
@ W_down. The FP8 one is one op of six float8 GEMMs whose wide operands the GLU kernels
write as float8 themselves. The check runs both on fresh random inputs (scales calibrated to
their amaxes, as delayed scaling settles to) against the float32 MLP, and the FP8 op's kernels
against its XLA composition.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mosaicbert_jax import fp8, fused
from mosaicbert_jax.fused import fp8_dense, fp8_mlp
from mosaicbert_jax.xla_flags import apply_gpu_defaults
from fused_ops import median_ms, relative_error

E4M3, E5M2 = fp8.FORWARD_DTYPE, fp8.BACKWARD_DTYPE
# Bars on the relative error against float32 (tests/test_fp8_mlp.py explains them).
BARS = {"y": 0.12, "dx": 0.2, "d_w_up": 0.2, "d_w_down": 0.2}


def random_inputs(tokens: int, hidden: int, intermediate: int, seed: int):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (tokens, hidden), jnp.float32)
    w_up = jax.random.normal(keys[1], (hidden, 2 * intermediate)) * 0.02
    w_down = jax.random.normal(keys[2], (intermediate, hidden)) * 0.02
    g = jax.random.normal(keys[3], (tokens, hidden)) * 1e-4
    dropout_seed = jax.random.bits(keys[4], (2,), jnp.uint32)
    return x, w_up, w_down, g, dropout_seed


def calibrated_group(x, w, g) -> dict:
    """One FP8 GEMM's stats whose scales map the float32 amaxes of its input x, kernel w and
    output gradient g to fmax (history empty), as delayed scaling settles to."""
    amax = lambda v: jnp.max(jnp.abs(v)).astype(jnp.float32)
    return {"input": (amax(x) / fp8.fp8_max(E4M3), jnp.zeros(16)),
            "kernel": (amax(w) / fp8.fp8_max(E4M3), jnp.zeros(16)),
            "output_grad": (amax(g) / fp8.fp8_max(E5M2), jnp.zeros(16))}


def calibrated_stats(x, w_up, w_down, g, seed, rate):
    """The FP8 MLP's two stats groups, calibrated (calibrated_group)."""
    ab = x @ w_up
    h, vjp = jax.vjp(lambda ab: fused.reference.glu_dropout(ab, seed, rate), ab)
    dab = vjp(g @ w_down.T)[0]
    return calibrated_group(x, w_up, dab), calibrated_group(h, w_down, g)


def bf16_mlp(x, w_up, w_down, seed, rate, impl):
    return fused.glu_dropout(x @ w_up, seed, rate, impl) @ w_down


def with_grads(fn, g):
    """fn's output and the gradients of all its arguments for the cotangent g."""
    def run(*args):
        y, vjp = jax.vjp(fn, *args)
        return (y,) + vjp(g)
    return run


def check(args, rate: float) -> bool:
    x, w_up, w_down, g, seed = random_inputs(args.tokens, args.hidden, args.intermediate,
                                             int(time.time()))
    up, down = calibrated_stats(x, w_up, w_down, g, seed, rate)
    with jax.default_matmul_precision("highest"):
        exact = jax.jit(with_grads(lambda a, b, c: fp8_mlp.glu_mlp_reference(
            a, b, c, seed, rate, jnp.float32), g))(x, w_up, w_down)
    bf = [v.astype(jnp.bfloat16) for v in (x, w_up, w_down)]
    ok = True
    results = {}
    for impl in ("auto", "xla"):
        results[impl] = jax.jit(with_grads(lambda a, b, c: fp8_mlp.glu_mlp(
            a, b, c, seed, up, down, rate, impl, jnp.bfloat16), g.astype(jnp.bfloat16)))(*bf)
    plain = jax.jit(with_grads(lambda a, b, c: bf16_mlp(a, b, c, seed, rate, "auto"),
                               g.astype(jnp.bfloat16)))(*bf)
    for i, name in enumerate(BARS):
        fp8_err = relative_error(results["auto"][i], exact[i])
        between = relative_error(results["auto"][i], results["xla"][i])
        bf16_err = relative_error(plain[i], exact[i])
        good = (np.isfinite(fp8_err) and 2e-3 < fp8_err < BARS[name]
                and between < 0.25 * fp8_err)
        ok &= bool(good)
        print(f"check rate={rate} {name}: fp8 vs float32 {fp8_err:.2e} (bar {BARS[name]}), "
              f"kernels vs XLA composition {between:.2e}, bf16 MLP vs float32 {bf16_err:.2e}"
              f" -> {'ok' if good else 'FAILED'}")
    return ok


def xla_quantising(fn):
    """fn with fused.quantize_fp8 replaced, while it is traced, by its XLA composition (an
    amax-and-cast fusion and a transpose), to time what the kernel saves."""
    def traced(*args):
        kernel = fused.quantize_fp8
        fused.quantize_fp8 = lambda x, inv, dtype, impl="auto": fused.reference.quantize_fp8(
            x, inv, dtype)
        try:
            return fn(*args)
        finally:
            fused.quantize_fp8 = kernel
    return traced


def check_qkv(args) -> bool:
    """The FP8 QKV projection (fp8_gemm "mlp_qkv", fused/fp8_dense.py) on fresh random inputs,
    bf16 operands: against the float32 dense, and its kernel against its XLA composition."""
    keys = jax.random.split(jax.random.key(int(time.time())), 3)
    n = 3 * args.hidden
    x = jax.random.normal(keys[0], (args.tokens, args.hidden))
    w = jax.random.normal(keys[1], (args.hidden, n)) * 0.02
    g = jax.random.normal(keys[2], (args.tokens, n)) * 1e-4
    stats = calibrated_group(x, w, g)
    with jax.default_matmul_precision("highest"):
        exact = (x @ w, g @ w.T, x.T @ g)
    runs = {impl: jax.jit(with_grads(lambda a, b: fp8_dense.dense(a, b, stats, impl,
                                                                   jnp.bfloat16),
                                     g.astype(jnp.bfloat16)))(x.astype(jnp.bfloat16),
                                                              w.astype(jnp.bfloat16))
            for impl in ("auto", "xla")}
    ok = True
    for i, name in enumerate(("y", "dx", "dw")):
        err = relative_error(runs["auto"][i], exact[i])
        between = relative_error(runs["auto"][i], runs["xla"][i])
        good = bool(np.isfinite(err) and 2e-3 < err < 0.12 and between < 0.25 * err)
        ok &= good
        print(f"check qkv {name}: fp8 vs float32 {err:.2e} (bar 0.12), kernel vs XLA "
              f"composition {between:.2e} -> {'ok' if good else 'FAILED'}")
    return ok


def qkv_timings(args) -> None:
    """The QKV projection (hidden -> 3 hidden) forward and forward + backward: bf16 against
    the FP8 dense with its kernel quantising x and d(qkv)."""
    keys = jax.random.split(jax.random.key(0), 3)
    n = 3 * args.hidden
    x = jax.random.normal(keys[0], (args.tokens, args.hidden), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (args.hidden, n)) * 0.02).astype(jnp.bfloat16)
    g = (jax.random.normal(keys[2], (args.tokens, n)) * 1e-4).astype(jnp.bfloat16)
    stats = {t: (jnp.float32(s), jnp.zeros(16)) for t, s in
             (("input", 5 / 448), ("kernel", 0.1 / 448), ("output_grad", 5e-4 / 57344))}
    variants = {"bf16 (x W)": lambda a, b: a @ b,
                "fp8 dense (fused/fp8_dense.py)":
                    lambda a, b: fp8_dense.dense(a, b, stats, "auto", jnp.bfloat16)}
    flops = 2 * args.tokens * args.hidden * n
    print(f"\n| QKV projection {args.hidden} -> {n} | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("| --- | --- | --- | --- |")
    base = None
    for name, fn in variants.items():
        fwd = median_ms(jax.jit(fn), x, w, reps=args.reps)
        both = median_ms(jax.jit(with_grads(fn, g)), x, w, reps=args.reps)
        base = base or both
        print(f"| {name} | {fwd:.3f} | {both:.3f} ({base / both:.2f}x) | "
              f"{3 * flops / (both * 1e-3) / 1e12:,.0f} |")


def timings(args) -> None:
    x, w_up, w_down, g, seed = random_inputs(args.tokens, args.hidden, args.intermediate, 0)
    up, down = calibrated_stats(x, w_up, w_down, g, seed, 0.1)
    bf = [v.astype(jnp.bfloat16) for v in (x, w_up, w_down)]
    gb = g.astype(jnp.bfloat16)
    variants = {
        "bf16 (x W_up, fused GLU kernel, W_down)":
            lambda a, b, c: bf16_mlp(a, b, c, seed, 0.1, "auto"),
        "fp8 mlp (fused/fp8_mlp.py)":
            lambda a, b, c: fp8_mlp.glu_mlp(a, b, c, seed, up, down, 0.1, "auto",
                                            jnp.bfloat16),
    }
    variants["fp8 mlp, x and dy quantised by XLA (session 9)"] = xla_quantising(
        variants["fp8 mlp (fused/fp8_mlp.py)"])
    flops = 2 * args.tokens * args.hidden * 3 * args.intermediate
    print("\n| MLP | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s (6 GEMM passes) |")
    print("| --- | --- | --- | --- |")
    base = None
    for name, fn in variants.items():
        fwd = median_ms(jax.jit(fn), *bf, reps=args.reps)
        both = median_ms(jax.jit(with_grads(fn, gb)), *bf, reps=args.reps)
        base = base or both
        print(f"| {name} | {fwd:.3f} | {both:.3f} ({base / both:.2f}x) | "
              f"{3 * flops / (both * 1e-3) / 1e12:,.0f} |")


SWEEP = ("glu_fp8_rows=32,glu_fp8_cols=128,glu_fp8_warps=4",
         "glu_fp8_rows=64,glu_fp8_cols=64,glu_fp8_warps=4",
         "glu_fp8_rows=64,glu_fp8_cols=128,glu_fp8_warps=8",
         "glu_fp8_rows=128,glu_fp8_cols=64,glu_fp8_warps=8",
         "glu_fp8_rows=32,glu_fp8_cols=256,glu_fp8_warps=8",
         "glu_fp8_rows=64,glu_fp8_cols=128,glu_fp8_warps=4",
         "glu_fp8_rows=64,glu_fp8_cols=256,glu_fp8_warps=8",
         "glu_fp8_rows=128,glu_fp8_cols=128,glu_fp8_warps=8")


def sweep(args) -> None:
    """The float8-out GLU kernels alone at several tiles (forward and backward get the same
    tile), beside the bf16 GLU kernels, with the bandwidth of the bytes each must move."""
    from mosaicbert_jax.fused import pallas_gpu
    interpret = jax.default_backend() != "gpu"   # CPU: the interpreter (for the tests)
    rows, width = args.tokens, args.intermediate
    keys = jax.random.split(jax.random.key(1), 2)
    h = jax.random.normal(keys[0], (rows, 2 * width), jnp.bfloat16)
    g = jax.random.normal(keys[1], (rows, width), jnp.bfloat16)
    seed, inv = jnp.array([1, 2], jnp.uint32), jnp.float32(100.0)
    # bf16 forward: read h, write the product; fp8: the product twice at 1 byte. The backward
    # also reads g and writes d(h) (bf16: 2 x 2 bytes; fp8: twice 2 x 1 byte).
    fwd_bytes, bwd_bytes = rows * width * (4 + 2), rows * width * (4 + 2 + 4)
    print("\n| GLU kernel | tiles | fwd ms | fwd GB/s | bwd ms | bwd GB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    glu = lambda h: pallas_gpu.glu_dropout(h, seed, 0.1, interpret=interpret)
    fwd = median_ms(jax.jit(glu), h, reps=args.reps)
    _, vjp = jax.vjp(glu, h)
    bwd = median_ms(jax.jit(lambda g: vjp(g)), g, reps=args.reps)
    print(f"| bf16 | defaults | {fwd:.3f} | {fwd_bytes / fwd / 1e6:,.0f} | {bwd:.3f} | "
          f"{bwd_bytes / bwd / 1e6:,.0f} |")
    for text in SWEEP:
        fields = dict(kv.split("=") for kv in text.split(","))
        fields.update({f"{k}_bwd": v for k, v in list(fields.items())})
        blocks = pallas_gpu.parse_blocks(",".join(f"{k}={v}" for k, v in fields.items()))
        fwd = median_ms(jax.jit(lambda h: pallas_gpu.glu_dropout_fp8(
            h, seed, 0.1, inv, E4M3, interpret, blocks)), h, reps=args.reps)
        bwd = median_ms(jax.jit(lambda h, g: pallas_gpu.glu_dropout_fp8_grad(
            h, g, seed, 0.1, inv, E5M2, interpret, blocks)), h, g, reps=args.reps)
        print(f"| fp8 | {text} | {fwd:.3f} | {fwd_bytes / fwd / 1e6:,.0f} | {bwd:.3f} | "
              f"{bwd_bytes / bwd / 1e6:,.0f} |")


def ablate(args) -> None:
    """The float8 GLU kernels (default tiles) with their amax, their transposed store or both
    left out: what each output costs (off-GPU: in the interpreter, for the tests)."""
    from mosaicbert_jax.fused import pallas_gpu as pg
    interpret = jax.default_backend() != "gpu"
    rows, width = args.tokens, args.intermediate
    keys = jax.random.split(jax.random.key(1), 2)
    h = jax.random.normal(keys[0], (rows, 2, width), jnp.bfloat16)
    g = jax.random.normal(keys[1], (rows, width), jnp.bfloat16)
    seed, inv = jnp.array([1, 2], jnp.uint32), jnp.full((1,), 100.0, jnp.float32)
    blocks = pg.default_blocks()
    print("\n| float8 GLU kernel | left out | ms |\n| --- | --- | --- |")
    for backward in (False, True):
        tiles = ((blocks.glu_fp8_rows_bwd, blocks.glu_fp8_cols_bwd, blocks.glu_fp8_warps_bwd)
                 if backward else (blocks.glu_fp8_rows, blocks.glu_fp8_cols, blocks.glu_fp8_warps))
        fp8_dtype = E5M2 if backward else E4M3
        body = pg._glu_fp8_bwd_kernel if backward else pg._glu_fp8_fwd_kernel
        for leave_out in ((), ("amax",), ("transposed",), pg.ABLATABLE_OUTPUTS):
            kernel = functools.partial(body, rate=0.1, fast=not interpret, fp8_dtype=fp8_dtype,
                                       leave_out=leave_out)
            call = pg._glu_fp8_call(kernel, rows, width, tiles, fp8_dtype, backward, interpret,
                                    "ablated")
            drop = "+".join(sorted(leave_out, reverse=True)) or "nothing"
            operands = (seed, inv, h, g) if backward else (seed, inv, h)
            print(f"| {'backward' if backward else 'forward'} {tiles} | {drop} | "
                  f"{median_ms(jax.jit(call), *operands, reps=args.reps):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the float8-out GLU kernels alone at several tiles")
    parser.add_argument("--ablate", action="store_true",
                        help="also time the float8-out GLU kernels without each of their "
                             "outputs")
    args = parser.parse_args()
    apply_gpu_defaults()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    ok = all([check(args, rate) for rate in (0.0, 0.1)] + [check_qkv(args)])
    print(f"fp8 mlp checks: {'all ok' if ok else 'FAILED'}")
    if not args.check_only:
        timings(args)
        qkv_timings(args)
    if args.sweep:
        sweep(args)
    if args.ablate:
        ablate(args)


if __name__ == "__main__":
    main()
