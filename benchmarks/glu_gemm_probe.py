"""Probe: GEMMs with the GLU fused into them (Pallas, Triton backend) against cuBLAS GEMMs plus
our separate GLU kernels, at the MLP's shapes. Decides whether our own GEMMs can remove the
GLU's memory-bound passes (benchmarks/RESULTS.md, "What limits the remaining targets").

  PYTHONPATH=.:benchmarks python benchmarks/glu_gemm_probe.py [--tokens 32768] [--hidden 768]
      [--intermediate 3072] [--tiles '128,64,64,4,4;128,128,64,8,3'] [--draws 1]

Forward: x [tokens, hidden] @ w_up [hidden, 2 x intermediate] = [a | b], written once for the
backward as the up-projection writes it, and in the same kernel's epilogue
h = dropout(gelu(a) * b) from the bf16-rounded a and b (what the GLU kernel reads), with the
same hash-dropout mask. The model's path: the up-projection GEMM, then
fused.pallas_gpu.glu_dropout.
Backward: g = dy @ w_down^T [tokens, intermediate], and in the epilogue d(a), d(b) from g and
the stored [a | b]. The model's path: the GEMM, then the GLU backward kernel.

Each draw checks both paths against float32 (the GEMMs in float32 from the same bf16
operands): the fused outputs' largest error may be at most 2x the model path's plus one bf16
step of the largest value (different accumulation orders round a few values to bf16
neighbours). Then times, per tile (block_m, block_n, block_k, warps, stages): the fused
forward and backward, the same Pallas GEMM writing only [a | b] (how fast our GEMM is
alone), against cuBLAS alone and the model's path. A tile that fails to build is reported and
skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fused_ops import median_ms, require_gpu
from mosaicbert_jax.fused import pallas_gpu, reference

DROPOUT = 0.1
TILES = "128,64,64,4,4;128,64,64,8,3;128,128,64,8,3;128,128,64,8,4;64,128,64,4,4;128,128,32,8,4"


class Tile(NamedTuple):
    """A program's output tile (block_m rows x block_n columns of each of a and b), the
    contraction step, and Triton's warps and pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


def parse_tiles(text: str) -> list[Tile]:
    """'128,64,64,4,4;...' -> Tiles; anything else is a one-line ValueError."""
    tiles = []
    for item in filter(None, text.split(";")):
        try:
            tiles.append(Tile(*(int(v) for v in item.split(","))))
        except (TypeError, ValueError):
            raise ValueError(f"tile {item!r} is not block_m,block_n,block_k,warps,stages") from None
    return tiles


def _up_kernel(seed_ref, x_ref, w_ref, ab_ref, *h_ref, block_k: int, rate: float, fast: bool):
    """[a | b] tile = x rows @ w columns (both halves), and h from them when h_ref is given."""
    block_m, hidden = x_ref.shape
    block_n = w_ref.shape[2]

    def step(k, accs):
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        xk = x_ref[:, ks]
        return tuple(acc + jnp.dot(xk, w_ref[ks, half, :], preferred_element_type=jnp.float32)
                     for half, acc in enumerate(accs))

    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    a, b = lax.fori_loop(0, hidden // block_k, step, (zeros, zeros))
    a, b = a.astype(ab_ref.dtype), b.astype(ab_ref.dtype)
    ab_ref[:, 0, :] = a
    ab_ref[:, 1, :] = b
    if h_ref:
        gated = pallas_gpu._gelu_parts(a.astype(jnp.float32), fast)[0] * b.astype(jnp.float32)
        h_ref[0][...] = pallas_gpu._dropped_tile(seed_ref, gated, rate).astype(h_ref[0].dtype)


def _down_grad_kernel(seed_ref, dy_ref, w_ref, ab_ref, dab_ref, *, block_k: int, rate: float,
                      fast: bool):
    """g tile = dy rows @ w_down^T columns; then d(a), d(b) of the GLU at the stored [a | b]."""
    block_m, hidden = dy_ref.shape
    block_n = w_ref.shape[0]

    def step(k, acc):
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        return acc + lax.dot_general(dy_ref[:, ks], w_ref[:, ks], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    g = lax.fori_loop(0, hidden // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
    g = g.astype(dab_ref.dtype).astype(jnp.float32)  # the model's path rounds g to bf16
    g = pallas_gpu._dropped_tile(seed_ref, g, rate)
    a = ab_ref[:, 0, :].astype(jnp.float32)
    b = ab_ref[:, 1, :].astype(jnp.float32)
    gelu, dgelu = pallas_gpu._gelu_parts(a, fast)
    dab_ref[:, 0, :] = (g * b * dgelu).astype(dab_ref.dtype)
    dab_ref[:, 1, :] = (g * gelu).astype(dab_ref.dtype)


def fused_up(x, w_up, seed, tile: Tile, glu: bool = True, rate: float = DROPOUT,
             interpret: bool = False):
    """([a | b] [tokens, 2 x width], h [tokens, width] or None) from one kernel."""
    tokens, hidden = x.shape
    width = w_up.shape[1] // 2
    ab_spec = pl.BlockSpec((tile.block_m, 2, tile.block_n), lambda i, j: (i, 0, j))
    h_spec = pl.BlockSpec((tile.block_m, tile.block_n), lambda i, j: (i, j))
    out_specs, out_shape = [ab_spec], [jax.ShapeDtypeStruct((tokens, 2, width), x.dtype)]
    if glu:
        out_specs.append(h_spec)
        out_shape.append(jax.ShapeDtypeStruct((tokens, width), x.dtype))
    outs = pl.pallas_call(
        functools.partial(_up_kernel, block_k=tile.block_k, rate=rate, fast=not interpret),
        grid=(tokens // tile.block_m, width // tile.block_n),
        in_specs=[pl.BlockSpec((2,), lambda i, j: (0,)),
                  pl.BlockSpec((tile.block_m, hidden), lambda i, j: (i, 0)),
                  pl.BlockSpec((hidden, 2, tile.block_n), lambda i, j: (0, 0, j))],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=tile.warps, num_stages=tile.stages),
        interpret=interpret, name="gemm_glu_fwd" if glu else "gemm_ab",
    )(seed, x, w_up.reshape(hidden, 2, width))
    return outs[0].reshape(tokens, 2 * width), (outs[1] if glu else None)


def fused_down_grad(dy, w_down, ab, seed, tile: Tile, rate: float = DROPOUT,
                    interpret: bool = False):
    """d[a | b] [tokens, 2 x width] of the GLU for the output cotangent dy @ w_down^T."""
    tokens, hidden = dy.shape
    width = w_down.shape[0]
    ab_spec = pl.BlockSpec((tile.block_m, 2, tile.block_n), lambda i, j: (i, 0, j))
    dab = pl.pallas_call(
        functools.partial(_down_grad_kernel, block_k=tile.block_k, rate=rate,
                          fast=not interpret),
        grid=(tokens // tile.block_m, width // tile.block_n),
        in_specs=[pl.BlockSpec((2,), lambda i, j: (0,)),
                  pl.BlockSpec((tile.block_m, hidden), lambda i, j: (i, 0)),
                  pl.BlockSpec((tile.block_n, hidden), lambda i, j: (j, 0)), ab_spec],
        out_specs=ab_spec, out_shape=jax.ShapeDtypeStruct((tokens, 2, width), dy.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tile.warps, num_stages=tile.stages),
        interpret=interpret, name="gemm_glu_bwd",
    )(seed, dy, w_down, ab.reshape(tokens, 2, width))
    return dab.reshape(tokens, 2 * width)


def model_up(x, w_up, seed, rate: float = DROPOUT, glu_impl: str = "pallas"):
    """The model's forward: the up-projection GEMM, then the GLU kernel (or composition)."""
    ab = jnp.dot(x, w_up, preferred_element_type=jnp.float32).astype(x.dtype)
    if glu_impl == "xla":
        return ab, reference.glu_dropout(ab, seed, rate)
    return ab, pallas_gpu.glu_dropout(ab, seed, rate, interpret=glu_impl == "pallas_interpret")


def model_down_grad(dy, w_down, ab, seed, rate: float = DROPOUT, glu_impl: str = "pallas"):
    """The model's backward into the GLU: g = dy @ w_down^T in bf16, then the GLU's VJP."""
    g = jnp.dot(dy, w_down.T, preferred_element_type=jnp.float32).astype(dy.dtype)
    if glu_impl == "xla":
        op = lambda h: reference.glu_dropout(h, seed, rate)
    else:
        op = lambda h: pallas_gpu.glu_dropout(h, seed, rate,
                                              interpret=glu_impl == "pallas_interpret")
    return jax.vjp(op, ab)[1](g)[0]


def float32_reference(x, w_up, dy, w_down, seed, rate: float = DROPOUT):
    """(ab, h, d_ab) with float32 GEMMs from the bf16 operands; the GLU from ab and g rounded
    to bf16 (as both paths round them), in float32."""
    f32 = lambda t: t.astype(jnp.float32)
    ab = jnp.dot(f32(x), f32(w_up), precision="highest")
    ab16 = f32(ab.astype(x.dtype))
    h = reference.glu_dropout(ab16, seed, rate)
    g = f32(jnp.dot(f32(dy), f32(w_down).T, precision="highest").astype(dy.dtype))
    d_ab = jax.vjp(lambda t: reference.glu_dropout(t, seed, rate), ab16)[1](g)[0]
    return ab, h, d_ab


def draw(rng, tokens: int, hidden: int, width: int, dtype=jnp.bfloat16):
    """x, w_up, dy, w_down, seed at the scales of a trained layer (unit activations,
    1/sqrt(fan-in) weights)."""
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), dtype)
    w_up = jnp.asarray(rng.standard_normal((hidden, 2 * width)) / np.sqrt(hidden), dtype)
    dy = jnp.asarray(rng.standard_normal((tokens, hidden)), dtype)
    w_down = jnp.asarray(rng.standard_normal((width, hidden)) / np.sqrt(width), dtype)
    seed = jnp.asarray(rng.integers(0, 2 ** 32, 2, dtype=np.uint64).astype(np.uint32))
    return x, w_up, dy, w_down, seed


def max_error(got, want) -> float:
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))


def check(fused_out, model_out, want, what: str) -> str:
    """Asserts the module docstring's bound for each output; returns what it saw."""
    seen = []
    for name, got, ours, ref in zip(("ab", "h", "d_ab"), fused_out, model_out, want):
        bound = 2 * max_error(ours, ref) + float(jnp.max(jnp.abs(ref))) * 2.0 ** -8
        err = max_error(got, ref)
        assert err <= bound, (what, name, err, bound)
        seen.append(f"{name} {err:.2e} (model path {max_error(ours, ref):.2e})")
    return ", ".join(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--tiles", default=TILES,
                        help="';'-separated block_m,block_n,block_k,warps,stages")
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    require_gpu(parser)
    try:
        tiles = parse_tiles(args.tiles)
    except ValueError as e:
        parser.error(str(e))
    tokens, hidden, width = args.tokens, args.hidden, args.intermediate
    model_fwd = jax.jit(model_up)
    model_bwd = jax.jit(model_down_grad)
    cublas_up = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                        .astype(x.dtype))
    cublas_down = jax.jit(lambda dy, w: jnp.dot(dy, w.T, preferred_element_type=jnp.float32)
                          .astype(dy.dtype))
    variants = {t: (jax.jit(functools.partial(fused_up, tile=t)),
                    jax.jit(functools.partial(fused_up, tile=t, glu=False)),
                    jax.jit(functools.partial(fused_down_grad, tile=t))) for t in tiles}
    inputs = draw(np.random.default_rng(0), tokens, hidden, width)
    x, w_up, dy, w_down, seed = inputs

    def build(tile):  # compile all three kernels of a tile (Triton builds run in threads)
        fwd, gemm, bwd = variants[tile]
        fwd.lower(x, w_up, seed).compile()
        gemm.lower(x, w_up, seed).compile()
        ab = jax.ShapeDtypeStruct((tokens, 2 * width), x.dtype)
        bwd.lower(dy, w_down, ab, seed).compile()
    built = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(tiles)) as pool:
        for tile, future in [(t, pool.submit(build, t)) for t in tiles]:
            try:
                future.result()
                built.append(tile)
            except Exception as e:  # a tile Triton cannot build (shared memory, registers)
                print(f"tile {tuple(tile)}: does not build: {str(e).splitlines()[0][:200]}",
                      flush=True)
    for i in range(args.draws):
        seed_value = int(np.random.SeedSequence().entropy % 2 ** 32)
        x_, w_up_, dy_, w_down_, s_ = draw(np.random.default_rng(seed_value), tokens, hidden,
                                           width)
        want = float32_reference(x_, w_up_, dy_, w_down_, s_)
        ab_m, h_m = model_fwd(x_, w_up_, s_)
        model_out = (ab_m, h_m, model_bwd(dy_, w_down_, ab_m, s_))
        for tile in built:
            fwd, _, bwd = variants[tile]
            ab_f, h_f = fwd(x_, w_up_, s_)
            seen = check((ab_f, h_f, bwd(dy_, w_down_, ab_f, s_)), model_out, want,
                         f"tile {tuple(tile)}, draw {i}, seed {seed_value}")
            print(f"draw {i}, tile {tuple(tile)}: within bound of float32: {seen} "
                  f"(seed {seed_value})", flush=True)

    flop = 2 * tokens * hidden * 2 * width
    ms = lambda fn, *a: median_ms(fn, *a, reps=args.reps)
    ab = cublas_up(x, w_up)
    print(f"\nGLU MLP GEMMs, {tokens} x {hidden} -> 2 x {width}, bf16, "
          f"{jax.devices()[0].device_kind}:")
    print("| what | forward ms | backward (g and d[a, b]) ms | up GEMM TFLOP/s |")
    print("| --- | --- | --- | --- |")
    t_up, t_down = ms(cublas_up, x, w_up), ms(cublas_down, dy, w_down)
    print(f"| cuBLAS GEMM alone | {t_up:.3f} | {t_down:.3f} | {flop / t_up / 1e9:.0f} |")
    print(f"| model path: cuBLAS + GLU kernel | {ms(model_fwd, x, w_up, seed):.3f} | "
          f"{ms(model_bwd, dy, w_down, ab, seed):.3f} | |", flush=True)
    for tile in built:
        fwd, gemm, bwd = variants[tile]
        t_gemm = ms(gemm, x, w_up, seed)
        print(f"| Pallas {tuple(tile)}: GEMM alone | {t_gemm:.3f} | | {flop / t_gemm / 1e9:.0f} |")
        print(f"| Pallas {tuple(tile)}: GLU fused | {ms(fwd, x, w_up, seed):.3f} | "
              f"{ms(bwd, dy, w_down, ab, seed):.3f} | |", flush=True)


if __name__ == "__main__":
    main()
