"""Which way of writing an FP8 dense layer XLA turns into cuBLASLt FP8 GEMMs, and how fast.

  PYTHONPATH=. python benchmarks/fp8_gemm_probe.py --json /tmp/fp8_probe.json

Times the forward and backward of one [tokens, k] x [k, n] dense layer (the base model's
Wqkv, attention output, GLU up and GLU down shapes at 256 x 128 tokens) written three ways:
bf16, fp8.fp8_matmul ("f8": float8 operands) and fp8's quantise-dequantise pattern ("qdq"),
under several XLA_FLAGS sets, each set in its own process (XLA reads its flags once). For
each it counts the GEMM custom calls of the compiled program (FP8 ones are
`__cublas$lt$matmul$f8`) and checks the result against float32 on fresh random inputs.

`--gemms-only` times just the layer's three GEMMs (forward, d(x), d(w)) with operands that
are already float8 and laid out contraction-major (as cuBLASLt's FP8 GEMMs take them),
beside the same three bf16 GEMMs: what FP8 could save if the kernels producing the operands
quantised and transposed them for free, i.e. the ceiling of an FP8 step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT_PREFIX = "FP8_PROBE "
FLAG_SETS = ("", "--xla_gpu_enable_triton_gemm=false",
             "--xla_gpu_enable_triton_gemm=false --xla_allow_excess_precision=false")
SHAPES = "32768:768:2304,32768:768:768,32768:768:6144,32768:3072:768"   # m:k:n


def layer_fns(dtype):
    """name -> f(x, w) of the three formulations, with fixed scales from the inputs' amaxes."""
    import jax
    import jax.numpy as jnp
    from mosaicbert_jax import fp8

    def stats(amax, fp8_dtype):  # constants: their "cotangents" (amaxes seen) go nowhere
        amax = jax.lax.stop_gradient(amax)
        return (jnp.float32(amax / fp8.fp8_max(fp8_dtype)), jnp.zeros(16, jnp.float32))

    def f8(x, w, g_amax):
        return fp8.fp8_matmul(dtype, x, w, stats(jnp.max(jnp.abs(x)), fp8.FORWARD_DTYPE),
                              stats(jnp.max(jnp.abs(w)), fp8.FORWARD_DTYPE),
                              stats(g_amax, fp8.BACKWARD_DTYPE))

    def qdq(x, w, g_amax):
        return fp8.qdq_dot_general(x, w, (((1,), (0,)), ((), ())),
                                   stats(jnp.max(jnp.abs(x)), fp8.FORWARD_DTYPE),
                                   stats(jnp.max(jnp.abs(w)), fp8.FORWARD_DTYPE),
                                   stats(g_amax, fp8.BACKWARD_DTYPE), dtype)

    return {"bf16": lambda x, w, g_amax: x @ w, "f8": f8, "qdq": qdq}


def random_layer(shape: str, g_scale: float):
    """Fresh float32 x [m, k], w [k, n], output gradient g [m, n] (times g_scale) for an
    "m:k:n" shape, and the float32 (x w, g w^T, x^T g) they should give."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    m, k, n = (int(v) for v in shape.split(":"))
    keys = jax.random.split(jax.random.key(int(time.time())), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32)
    w = jax.random.normal(keys[1], (k, n), jnp.float32) / np.sqrt(k)
    g = jax.random.normal(keys[2], (m, n), jnp.float32) * g_scale
    with jax.default_matmul_precision("highest"):
        want = [np.asarray(v) for v in jax.jit(lambda x, w, g: (
            x @ w, g @ w.T, x.T @ g))(x, w, g)]
    return x, w, g, want


def report(jitted, operands: tuple, want: list, iters: int, shape: str, name: str) -> None:
    """Compiles jitted on operands, checks its outputs against want (float32), times it (the
    median of three runs of `iters` calls) and prints one result line."""
    import jax
    import numpy as np
    from profile_step import gemm_custom_calls

    m, k, n = (int(v) for v in shape.split(":"))
    text = jitted.lower(*operands).compile().as_text()
    calls = gemm_custom_calls(text)
    out = jitted(*operands)
    errors = [float(np.linalg.norm(np.asarray(o, np.float32) - r) / np.linalg.norm(r))
              for o, r in zip(out, want)]
    times = []
    for _ in range(3):
        jax.block_until_ready(jitted(*operands))
        t = time.perf_counter()
        for _ in range(iters):
            out = jitted(*operands)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / iters)
    ms = sorted(times)[1] * 1e3
    print(RESULT_PREFIX + json.dumps({
        "flags": os.environ.get("XLA_FLAGS", ""), "shape": shape, "gemm": name,
        "ms": ms, "tflops": 6 * m * k * n / (ms * 1e-3) / 1e12, "rel_errors": errors,
        "fp8_gemms": calls["__cublas$lt$matmul$f8"],
        "bf16_gemms": calls["__cublas$lt$matmul"] + calls["__cublas$gemm"],
        "triton_gemms": text.count('"kind":"__triton_gemm"'),
        "transposes": text.count(" transpose(")}), flush=True)


def gemm_fns():
    """f(x, w_t, g, w, x_t, g_t): the layer's three GEMMs y = x w, dx = g w^T, dw = x^T g,
    each operand given with its contraction dim last (x [m, k], w_t [n, k], g [m, n],
    w [k, n], x_t [k, m], g_t [n, m]), so no GEMM needs a transpose."""
    import jax
    import jax.numpy as jnp

    last = (((1,), (1,)), ((), ()))

    def three(x, w_t, g, w, x_t, g_t):
        out = jnp.bfloat16
        return (jax.lax.dot_general(x, w_t, last, preferred_element_type=out),
                jax.lax.dot_general(g, w, last, preferred_element_type=out),
                jax.lax.dot_general(x_t, g_t, last, preferred_element_type=out))

    return three


def gemms_child(args) -> None:
    """The three GEMMs of each shape in bf16 and float8 (e4m3 x, w; e5m2 g), timed alone."""
    import jax
    import jax.numpy as jnp
    from mosaicbert_jax import fp8

    for shape in args.shapes.split(","):
        x, w, g, want = random_layer(shape, g_scale=1.0)
        fwd, bwd = fp8.FORWARD_DTYPE, fp8.BACKWARD_DTYPE
        variants = {"bf16_gemms": (jnp.bfloat16,) * 3, "f8_gemms": (fwd, fwd, bwd)}
        for name, (x_dtype, w_dtype, g_dtype) in variants.items():
            operands = [jax.block_until_ready(jax.jit(lambda v, d=d: v.astype(d))(v))
                        for v, d in ((x, x_dtype), (w.T, w_dtype), (g, g_dtype),
                                     (w, w_dtype), (x.T, x_dtype), (g.T, g_dtype))]
            report(jax.jit(gemm_fns()), operands, want, args.iters, shape, name)


def child(args) -> None:
    """One flag set (already in XLA_FLAGS): every shape x formulation, one result line each."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16
    for shape in args.shapes.split(","):
        x, w, g, want = random_layer(shape, g_scale=1e-4)
        xb, wb, gb = (v.astype(dtype) for v in (x, w, g))
        for name, f in layer_fns(dtype).items():
            def fwd_bwd(x, w, g, f=f):
                y, vjp = jax.vjp(lambda a, b: f(a, b, jnp.max(jnp.abs(g)).astype(jnp.float32)),
                                 x, w)
                return (y, *vjp(g))
            report(jax.jit(fwd_bwd), (xb, wb, gb), want, args.iters, shape, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="comma list of m:k:n")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--flag-sets", default="|".join(FLAG_SETS),
                        help="'|'-separated XLA_FLAGS sets, each run in its own process")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per flag set")
    parser.add_argument("--json", default="")
    parser.add_argument("--gemms-only", action="store_true",
                        help="time the three GEMMs alone, operands already float8 / bf16")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        return gemms_child(args) if args.gemms_only else child(args)
    rows = []
    for flags in args.flag_sets.split("|"):
        env = dict(os.environ, XLA_FLAGS=flags)
        command = [sys.executable, os.path.abspath(__file__), "--_child", "--shapes",
                   args.shapes, "--iters", str(args.iters)] + (
                       ["--gemms-only"] if args.gemms_only else [])
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            proc = e
            print(f"flags {flags!r}: TIMED OUT after {args.timeout} s", flush=True)
        stdout = proc.stdout or ""
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        found = [json.loads(l[len(RESULT_PREFIX):]) for l in stdout.splitlines()
                 if l.startswith(RESULT_PREFIX)]
        if not found:
            stderr = proc.stderr or ""
            print(f"flags {flags!r}: no results\n{str(stderr)[-1500:]}", flush=True)
        for r in found:
            print(f"{r['flags'] or '(none)'} | {r['shape']} | {r['gemm']} | {r['ms']:.3f} ms | "
                  f"{r['tflops']:.0f} TFLOP/s | fp8 {r['fp8_gemms']} bf16 {r['bf16_gemms']} "
                  f"triton {r['triton_gemms']} transposes {r.get('transposes', '-')} | err "
                  + " ".join(f"{e:.1e}" for e in r["rel_errors"]), flush=True)
        rows += found
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
