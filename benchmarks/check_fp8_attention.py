"""Checks and times the FP8 attention backward that writes d(qkv) as float8 (fused/fp8_attention.py).

  PYTHONPATH=.:tests python benchmarks/check_fp8_attention.py

First, compiled on this GPU and on fresh random packed layouts (tests/fp8_attention_cases.py):
the kernels' float8 d(qkv) and its transpose against the plain bf16 backward followed by the
quantize kernel, and the whole op (FP8 QKV projection + attention) against fused/fp8_dense.py's
op followed by the attention. In the Pallas interpreter (the CPU tests) both are bit-identical.
Compiled, the two dK/dV kernels are separate Triton programs whose float32 sums may round
apart, so here at most 1e-5 of the float8 values may sit one code away (a bf16 rounding flip
before the quantisation, or a sign flip of a value that rounds to zero; 1 of 2,359,296
in the first run), the amaxes and bias gradients
agree to float32 summation order, the forward output is bit-identical and the gradients
agree to 1e-3.
Then times the two backwards at the base step's shape (--batch 256 x 128 tokens, 12 heads of
64) and prints a table. Exits non-zero on the first mismatch. --sweep then searches the
float8 backward's tiles (sweep_tiles), e.g. --draws 0 --sweep for the sweep alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention_cases import fresh_rng, random_packed_layouts, relative_error
from fused_ops import median_ms, require_gpu
from fp8_attention_cases import (assert_same_bits, bits, kernel_grads,
                                 op_outputs_and_grads)
from mosaicbert_jax import fp8, fused
from mosaicbert_jax.attention import alibi_slopes, pallas_gpu

E5M2 = fp8.BACKWARD_DTYPE


def _codes_apart(a: jax.Array, b: jax.Array) -> np.ndarray:
    """Per element, how many float8 codes a and b lie apart along the number line (0 for +0
    and -0): each byte's rank among the dtype's finite values, from a 256-entry table (so
    75M-element layouts take a fraction of a second)."""
    values = np.arange(256, dtype=np.uint8).view(a.dtype).astype(np.float32)
    finite = np.unique(values[np.isfinite(values)])
    rank = np.searchsorted(finite, values).astype(np.int32)  # non-finite codes rank past the end
    code = lambda x: np.asarray(jax.device_get(x)).view(np.uint8)
    return np.abs(rank[code(a)] - rank[code(b)])


def assert_kernels_agree(got, want, what: str, max_share: float = 1e-5) -> float:
    """The float8 d(qkv) layouts within one code of each other at <= max_share of the values;
    amax and d(bias) to float32 summation order. Returns the larger share one code apart."""
    (q, q_t, amax), d_bias = got
    (want_q, want_t, want_amax), want_bias = want
    shares = []
    for name, a, b in (("d(qkv)", q, want_q), ("d(qkv) transposed", q_t, want_t)):
        apart = _codes_apart(a, b)
        shares.append(float(np.mean(apart > 0)))
        assert apart.max() <= 1, (name, int(apart.max()), what)
        assert shares[-1] <= max_share, (name, shares[-1], what)
    assert abs(float(amax) / float(want_amax) - 1) < 8e-3, what  # one bf16 ulp
    assert relative_error(d_bias, want_bias) < 1e-4, what
    return max(shares)


def assert_op_agrees(got, want, what: str) -> None:
    """The same forward bytes; gradients and amaxes within 1e-3 of the two-op path's."""
    assert_same_bits(got[0], want[0], what)
    for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        if not np.any(np.asarray(b, np.float32)):  # the stats histories' zero cotangents
            assert not np.any(np.asarray(a, np.float32)), what
            continue
        assert relative_error(a, b) < 1e-3, (relative_error(a, b), what)


def _timed_case(batch: int, seq: int, heads: int, head_dim: int):
    """Inputs of one layer's attention backward at a model shape: (qkv, bias, segments,
    slopes, scale, out, lse, d_out), the forward run with the default blocks."""
    rng = np.random.default_rng(0)
    segments = jnp.asarray(random_packed_layouts(rng, batch, seq))
    qkv = jnp.asarray(rng.standard_normal((batch, seq, 3, heads, head_dim)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((3, heads, head_dim)) * 0.3, jnp.bfloat16)
    slopes = jnp.asarray(alibi_slopes(heads), jnp.float32)
    sizes = pallas_gpu.fp8_grad_block_sizes(seq, head_dim)
    scale = head_dim ** -0.5
    out, lse = jax.jit(lambda: pallas_gpu.qkv_forward(qkv, bias, segments, slopes, scale,
                                                      sizes))()
    d_out = jnp.asarray(rng.standard_normal(out.shape), jnp.bfloat16)
    return qkv, bias, segments, slopes, scale, out, lse, d_out


def _float8_backward(case, sizes: pallas_gpu.BlockSizes):
    """The jitted float8-writing backward of `case` with the given blocks: f(d_out, inv)."""
    qkv, bias, segments, slopes, scale, out, lse, _ = case
    return jax.jit(lambda d_out, inv: pallas_gpu.qkv_backward_fp8(
        qkv, bias, segments, slopes, out, lse, d_out, scale, sizes, inv, E5M2))


def time_backwards(batch: int, seq: int, heads: int, head_dim: int) -> dict:
    """ms of the plain backward + quantize pass and of the float8-writing backward."""
    case = _timed_case(batch, seq, heads, head_dim)
    qkv, bias, segments, slopes, scale, out, lse, d_out = case
    sizes = pallas_gpu.fp8_grad_block_sizes(seq, head_dim)
    inv = jnp.float32(1000.0)

    @jax.jit
    def plain(d_out, inv):
        d_qkv, d_bias = pallas_gpu._backward(qkv, qkv, qkv, segments, slopes, out, lse, d_out,
                                             scale, sizes, False, 0, pallas_gpu.QKV_SLOTS,
                                             bias)
        return fused.quantize_fp8(d_qkv.reshape(batch * seq, -1), inv, E5M2, "pallas"), d_bias

    return {"bf16 backward + quantize_fp8": median_ms(plain, d_out, inv, reps=50),
            "float8 d(qkv) from the kernels": median_ms(_float8_backward(case, sizes), d_out,
                                                        inv, reps=50)}


# Tile values the sweep tries for each backward field (the dQ kernel's, the dK/dV kernel's,
# and the launch settings both share).
SWEEP_VALUES = {
    "block_q_dq": (32, 64, 128), "block_k_dq": (16, 32, 64),
    "block_q_dkv": (16, 32, 64), "block_k_dkv": (32, 64, 128),
    "num_warps_bwd": (2, 4, 8), "num_stages_bwd": (1, 2, 3, 4),
}


def sweep_tiles(batch: int, seq: int, heads: int, head_dim: int, passes: int = 2,
                fields: tuple = tuple(SWEEP_VALUES)) -> dict:
    """Coordinate descent over SWEEP_VALUES (the named fields, in that order) for the
    float8-writing backward at one layer's shape: each field in turn takes the value that
    times fastest with the others held (kept only when it is > 1% faster). A field's
    candidates are built in parallel threads (one variant's two Triton kernels took about 45 s
    to build on an H200 host, session 16), then checked and timed one by one. Every variant's
    float8 d(qkv) is checked against the default blocks' (within one code at <= 1e-4 of the
    values: other tiles sum in another order). Prints a row per variant; returns the winning
    overrides."""
    case = _timed_case(batch, seq, heads, head_dim)
    d_out, inv = case[-1], jnp.float32(1000.0)
    default = pallas_gpu.fp8_grad_block_sizes(seq, head_dim)
    want = jax.device_get(_float8_backward(case, default)(d_out, inv))
    timed: dict = {}

    def build(key):
        try:
            sizes = dataclasses.replace(default, **dict(key))
            return _float8_backward(case, sizes).lower(d_out, inv).compile()
        except Exception as e:  # a tile Triton cannot build (shared memory, registers)
            return e

    def time_variant(key, fn) -> None:
        note = ""
        if isinstance(fn, Exception):
            timed[key], note = float("inf"), f"failed to build: {str(fn).splitlines()[0][:80]}"
        else:
            try:
                apart = assert_kernels_agree(fn(d_out, inv), want, str(key), max_share=1e-4)
                timed[key], note = median_ms(fn, d_out, inv, reps=50), f"{apart:.1e} apart"
            except AssertionError as e:
                timed[key], note = float("inf"), f"mismatch: {str(e)[:80]}"
        label = ",".join(f"{k}={v}" for k, v in key) or "(default)"
        print(f"| {label} | {timed[key]:.4f} | {note} |", flush=True)

    def time_all(keys) -> None:
        keys = [k for k in dict.fromkeys(keys) if k not in timed]
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max(1, len(keys))) as pool:
            built = list(pool.map(build, keys))
        if keys:
            print(f"(built {len(keys)} in {time.perf_counter() - t:.0f} s)", flush=True)
        for key, fn in zip(keys, built):
            time_variant(key, fn)

    print(f"\nfloat8 backward tile sweep, {batch} x {seq} tokens, {heads} heads x {head_dim}, "
          f"default {default}:\n| overrides | ms | check |\n| --- | --- | --- |")
    best: dict = {}
    time_all([()])
    best_ms = timed[()]
    for _ in range(passes):
        for field in fields:
            trials = []
            for value in SWEEP_VALUES[field]:
                trial = {**best, field: value}
                if value == getattr(default, field):
                    del trial[field]
                trials.append(tuple(sorted(trial.items())))
            time_all(trials)
            for key in trials:
                if timed[key] < 0.99 * best_ms:
                    best, best_ms = dict(key), timed[key]
    print(f"best: {','.join(f'{k}={v}' for k, v in sorted(best.items())) or '(default)'} "
          f"{best_ms:.4f} ms against {timed[()]:.4f} ms for the default")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--batch", type=int, default=256, help="rows of the timed case")
    parser.add_argument("--sweep", action="store_true",
                        help="then sweep the float8 backward's tiles (sweep_tiles)")
    parser.add_argument("--sweep-fields", default=",".join(SWEEP_VALUES),
                        help="the BlockSizes fields the sweep walks, in order")
    args = parser.parse_args()
    require_gpu(parser)
    for seq in map(int, args.seqs.split(",")):
        for draw in range(args.draws):
            rng, seed = fresh_rng()
            window = 0 if draw % 2 == 0 else 48
            got, want, clipped = kernel_grads(rng, False, 8, seq, 12, 64, window)
            assert_kernels_agree(got, want, f"kernels seq {seq} seed {seed} window {window}")
            apart = sum(int(np.sum(_codes_apart(a, b) > 0)) for a, b in zip(got[0][:2],
                                                                            want[0][:2]))
            got, want = op_outputs_and_grads(rng, "pallas", 8, seq, 12, 64, window)
            assert_op_agrees(got, want, f"op seq {seq} seed {seed} window {window}")
            print(f"seq {seq} window {window}: kernels and op agree with the two-op path "
                  f"({apart} float8 values one code apart; {100 * clipped:.3f}% clipped; "
                  f"seed {seed})", flush=True)
    timings = time_backwards(args.batch, 128, 12, 64)
    print(f"\nattention backward of one layer, {args.batch} x 128 tokens, 12 heads x 64, "
          f"{jax.devices()[0].device_kind}:")
    print("| backward | ms |\n| --- | --- |")
    for name, ms in timings.items():
        print(f"| {name} | {ms:.3f} |")
    if args.sweep:
        fields = tuple(filter(None, args.sweep_fields.split(",")))
        unknown = sorted(set(fields) - set(SWEEP_VALUES))
        if unknown:
            parser.error(f"--sweep-fields {unknown} are not among {sorted(SWEEP_VALUES)}")
        sweep_tiles(args.batch, 128, 12, 64, fields=fields)


if __name__ == "__main__":
    main()
