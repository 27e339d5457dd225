"""The fused memory-bound kernels beside the plain XLA composition: check, then time.

  PYTHONPATH=. python benchmarks/fused_ops.py [--tokens 32768] [--reps 20] [--ops glu,layernorm]
      [--variants 'ln_rows_bwd=2,ln_warps_bwd=2;ln_rows=8']

For GLU + dropout (h = [a | b], 2 x 3072 wide) and dropout + residual + LayerNorm (768 wide)
at MosaicBERT-base shapes: first compares the Pallas kernels with the XLA composition on fresh
random inputs (float32: the same dropout mask, so errors are float rounding; bf16: within bf16
rounding), forward and gradients; then times forward and forward+backward of each, and prints
achieved memory bandwidth against the fewest bytes each pass must move. The tiles timed are
the built-in sweep, or --variants (FusedBlocks overrides, each timed in the op its fields
name, as a backward variant when they end in _bwd).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mosaicbert_jax import fused
from mosaicbert_jax.field_overrides import parse_field_overrides
from mosaicbert_jax.fused import pallas_gpu
from mosaicbert_jax.xla_flags import apply_gpu_defaults


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def median_ms(fn, *args, reps: int, rounds: int = 5) -> float:
    """Device time per call: `reps` calls dispatched back to back (so dispatch overlaps the
    GPU work, as inside a train step), median over `rounds`."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        outs = [fn(*args) for _ in range(reps)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t) / reps)
    return float(np.median(times)) * 1e3


def require_gpu(parser: argparse.ArgumentParser) -> None:
    """A one-line usage error where JAX has no GPU: the GPU kernel checks compile their
    kernels for one (the tests run the same kernels in the Pallas interpreter)."""
    if jax.default_backend() != "gpu":
        parser.error(f"its kernels compile for a GPU and this machine's JAX backend is "
                     f"{jax.default_backend()} (the tests run them in the Pallas interpreter)")


def glu_case(tokens: int, width: int, dtype, rng):
    h = jnp.asarray(rng.standard_normal((tokens, 2 * width)), dtype)
    g = jnp.asarray(rng.standard_normal((tokens, width)), dtype)
    seed = jnp.asarray(rng.integers(0, 2 ** 32, 2, dtype=np.uint64).astype(np.uint32))

    def make(impl, blocks=None):
        def op(h):
            if blocks is not None:
                return pallas_gpu.glu_dropout(h, seed, 0.1, blocks=blocks)
            return fused.glu_dropout(h, seed, 0.1, impl)
        fwd = jax.jit(op)
        def fwd_bwd(h, g):  # the output too, so the forward kernel is not dead code
            out, vjp = jax.vjp(op, h)
            return out, vjp(g)[0]
        fwd_bwd = jax.jit(fwd_bwd)
        return fwd, fwd_bwd
    # bytes: fwd reads h, writes out; bwd reads h and g, writes dh
    item = jnp.dtype(dtype).itemsize
    bytes_fwd = tokens * 3 * width * item
    bytes_bwd = tokens * 5 * width * item
    return (h, g), make, bytes_fwd, bytes_bwd


def ln_case(tokens: int, width: int, dtype, rng):
    x = jnp.asarray(rng.standard_normal((tokens, width)), dtype)
    r = jnp.asarray(rng.standard_normal((tokens, width)), dtype)
    dy = jnp.asarray(rng.standard_normal((tokens, width)), dtype)
    x_bias = jnp.asarray(0.2 * rng.standard_normal(width), jnp.float32)
    scale = jnp.asarray(1 + 0.2 * rng.standard_normal(width), jnp.float32)
    bias = jnp.asarray(0.2 * rng.standard_normal(width), jnp.float32)
    seed = jnp.asarray(rng.integers(0, 2 ** 32, 2, dtype=np.uint64).astype(np.uint32))

    def make(impl, blocks=None):
        def op(x, r):
            if blocks is not None:
                return pallas_gpu.dropout_add_layernorm(x, r, scale, bias, seed, 0.1, 1e-12,
                                                        x_bias, blocks=blocks)
            return fused.dropout_add_layernorm(x, r, scale, bias, seed, 0.1, 1e-12, x_bias,
                                               implementation=impl)
        fwd = jax.jit(op)
        def fwd_bwd(x, r, dy):
            out, vjp = jax.vjp(op, x, r)
            return (out,) + vjp(dy)
        fwd_bwd = jax.jit(fwd_bwd)
        return fwd, fwd_bwd
    item = jnp.dtype(dtype).itemsize
    return (x, r, dy), make, tokens * 3 * width * item, tokens * 5 * width * item


def variant_fields(text: str) -> tuple[str, str, dict]:
    """'ln_rows_bwd=2,ln_warps_bwd=2' -> ("layernorm", "bwd", fields): the op its fields
    name and whether they are backward tiles; mixed or unknown fields: a one-line ValueError."""
    pallas_gpu.parse_blocks(text)  # unknown fields, values that are not powers of two
    named = {k: int(v) for k, v in
             parse_field_overrides(text, pallas_gpu.FusedBlocks, "fused block").items()}
    ops = {"glu" if k.startswith("glu_") and not k.startswith("glu_fp8_")
           else "layernorm" if k.startswith("ln_") else k for k in named}
    parts = {"bwd" if k.endswith("_bwd") else "fwd" for k in named}
    if len(ops) != 1 or not ops <= {"glu", "layernorm"} or len(parts) != 1:
        raise ValueError(f"variant {text!r}: give the fields of one op (the bf16 glu_* or "
                         f"ln_*), all forward or all backward (_bwd)")
    return ops.pop(), parts.pop(), named


def _label(fields: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in fields.items())


def check(name, case, dtype, tol, blocks=None, label: str = "") -> bool:
    """The Pallas kernels (default tiles, or `blocks`) against the XLA composition."""
    inputs, make, _, _ = case
    fwd_inputs = inputs[:-1]
    results = {}
    for impl in ("xla", "pallas"):
        fwd, fwd_bwd = make(impl, None if impl == "xla" else blocks)
        out, *grads = jax.tree_util.tree_leaves(fwd_bwd(*inputs))
        results[impl] = (fwd(*fwd_inputs), out, *grads)
    errors = [relative_error(p, x) for p, x in zip(results["pallas"], results["xla"])]
    finite = all(bool(jnp.all(jnp.isfinite(p.astype(jnp.float32)))) for p in results["pallas"])
    ok = finite and max(errors) < tol
    what = f"{name} {jnp.dtype(dtype).name}" + (f" {label}" if label else "")
    print(f"check {what}: relative errors (out, grads) "
          f"{', '.join(f'{e:.1e}' for e in errors)} (bar {tol:.0e}) -> {'ok' if ok else 'FAIL'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--best-out", default="", help="write the fastest blocks here")
    parser.add_argument("--ops", default="glu,layernorm", help="comma list: glu, layernorm")
    parser.add_argument("--variants", default="",
                        help="';'-separated FusedBlocks overrides to time instead of the "
                             "built-in sweep, e.g. 'ln_rows_bwd=2,ln_warps_bwd=2;ln_rows=8'")
    args = parser.parse_args()
    ops = args.ops.split(",")
    if set(ops) - {"glu", "layernorm"}:
        parser.error(f"--ops={args.ops}: use a comma list of glu, layernorm")
    try:
        given = [variant_fields(text) for text in filter(None, args.variants.split(";"))]
    except ValueError as e:
        parser.error(str(e))
    apply_gpu_defaults()
    rng = np.random.default_rng(int(time.time()))
    ok = True
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        if "glu" in ops:
            ok &= check("glu", glu_case(4096, 3072, dtype, rng), dtype, tol)
        if "layernorm" in ops:
            ok &= check("layernorm", ln_case(4096, 768, dtype, rng), dtype, tol)
    for op, _, fields in given:  # each given variant too, in float32, before it is timed
        if op in ops:
            case = (glu_case(4096, 3072, jnp.float32, rng) if op == "glu"
                    else ln_case(4096, 768, jnp.float32, rng))
            label = _label(fields)
            ok &= check(op, case, jnp.float32, 1e-5, pallas_gpu.parse_blocks(label), label)
    print("| op | variant | fwd ms | fwd GB/s | fwd+bwd ms | bwd GB/s (fwd+bwd - fwd) |")
    print("| --- | --- | --- | --- | --- | --- |")
    # Forward tiles and backward tiles are independent fields: sweep each with the other at its
    # default, pick the fastest forward by forward time and the fastest backward by
    # (forward + backward) - forward.
    glu_fwd = [dict(glu_rows=r, glu_cols=c, glu_warps=w) for r, c, w in (
        (8, 256, 4), (16, 256, 4), (2, 1024, 4), (1, 1024, 2), (4, 1024, 4), (1, 2048, 4),
        (2, 2048, 8), (32, 128, 4))]
    glu_bwd = [dict(glu_rows_bwd=r, glu_cols_bwd=c, glu_warps_bwd=w) for r, c, w in (
        (8, 256, 4), (4, 256, 2), (4, 512, 4), (16, 128, 4), (2, 512, 4))]
    ln_fwd = [dict(ln_rows=r, ln_warps=w) for r, w in ((4, 4), (2, 2), (8, 4), (1, 1), (16, 8))]
    ln_bwd = [dict(ln_rows_bwd=r, ln_block_rows_bwd=b, ln_warps_bwd=w) for r, b, w in (
        (4, 64, 4), (4, 4, 4), (4, 128, 4), (8, 64, 4), (2, 32, 2), (8, 128, 8), (4, 32, 4),
        (16, 256, 8))]
    # Pipelined row loop, and sums kept as row tiles until the block's end (not yet measured).
    ln_bwd += [dict(ln_rows_bwd=8, ln_block_rows_bwd=64, ln_stages_bwd=2),
               dict(ln_rows_bwd=8, ln_block_rows_bwd=64, ln_deferred_sums_bwd=1),
               dict(ln_rows_bwd=4, ln_block_rows_bwd=64, ln_deferred_sums_bwd=1),
               dict(ln_rows_bwd=4, ln_block_rows_bwd=64, ln_deferred_sums_bwd=1, ln_warps_bwd=8),
               dict(ln_rows_bwd=8, ln_block_rows_bwd=64, ln_deferred_sums_bwd=1,
                    ln_stages_bwd=2)]
    if args.variants:
        glu_fwd, glu_bwd, ln_fwd, ln_bwd = (
            [fields for op, part, fields in given if (op, part) == key]
            for key in (("glu", "fwd"), ("glu", "bwd"), ("layernorm", "fwd"),
                        ("layernorm", "bwd")))
    cases = {"glu": (glu_case(args.tokens, 3072, jnp.bfloat16, rng), glu_fwd, glu_bwd),
             "layernorm": (ln_case(args.tokens, 768, jnp.bfloat16, rng), ln_fwd, ln_bwd)}
    cases = {name: case for name, case in cases.items() if name in ops}
    best = {}
    for name, (case, fwd_variants, bwd_variants) in cases.items():
        inputs, make, bytes_fwd, bytes_bwd = case
        variants = ([("xla", None, "")] + [(_label(f), f, "fwd") for f in fwd_variants]
                    + [(_label(f), f, "bwd") for f in bwd_variants])
        for label, fields, part in variants:
            blocks = None if fields is None else pallas_gpu.parse_blocks(label)
            fwd, fwd_bwd = make("xla" if blocks is None else "pallas", blocks)
            try:
                t_fwd = median_ms(fwd, *inputs[:-1], reps=args.reps)
                t_all = median_ms(fwd_bwd, *inputs, reps=args.reps)
            except Exception as e:  # a block shape the compiler refuses: report, go on
                print(f"| {name} | {label} | FAILED {type(e).__name__}: {str(e)[:120]} |")
                continue
            bwd = max(t_all - t_fwd, 1e-6)
            print(f"| {name} | {label} | {t_fwd:.3f} | {bytes_fwd / t_fwd / 1e6:,.0f} | "
                  f"{t_all:.3f} | {bytes_bwd / bwd / 1e6:,.0f} |")
            if part:
                key, value = (name, part), (t_fwd if part == "fwd" else bwd)
                if value < best.get(key, (float("inf"), ""))[0]:
                    best[key] = (value, label)
    blocks_text = ",".join(label for _, label in best.values())
    print(f"fastest blocks: --fused-blocks {blocks_text}")
    if args.best_out:
        with open(args.best_out, "w") as f:
            f.write(blocks_text)
    print("fused checks:", "all ok" if ok else "FAILED")


if __name__ == "__main__":
    main()
