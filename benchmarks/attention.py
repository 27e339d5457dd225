"""Attention benchmark for the GPU machine: correctness first, then median times.

For each sequence length (batch = tokens // seq, so every size moves the same number of
tokens), each segment layout and each implementation it times the forward pass and the
forward+backward pass (gradients of q, k, v) and prints a table with TFLOP/s; the table is
also written as markdown to --results. Layouts:
  one     one document per row (nothing to skip),
  two     two documents of seq/2 per row (the layout of the anchors in docs/attention.md),
  packed  documents of mixed lengths (seq/8 .. seq/2) packed into rows, some rows ending in
          padding.
TFLOP/s count only the (query, key) pairs the mask leaves visible (for 'one' that is all of
them): 4 * heads * head_dim * visible pairs for the forward, 3.5 times that for
forward+backward. The cuDNN and tokamax baselines get the ALiBi + segment mask as one
materialised [batch, heads, seq, seq] bias built outside the timed call (their kernels have
no in-kernel ALiBi); 'xla' is our reference, which builds its bias inside.

pallas_qkv_sliced and pallas_qkv time the kernel the way the model calls it, on one fused
[batch, seq, 3, heads, head_dim] projection output with the gradient of that array:
sliced = the three slices into flash_attention (copies before, a concatenate after),
pallas_qkv = flash_attention_qkv (slots read in place, d(qkv) written by the kernels).

--window W (> 0) times sliding-window attention (keys with |i - j| <= W) in every
implementation that has it (the baselines get the window in their materialised bias; the
Triton kernel has none and is skipped); visible pairs then count the window too.

Run on the GPU machine: PYTHONPATH=. python3 benchmarks/attention.py [--results PATH]
(add triton to --impls for the jax-triton kernel); on a TPU VM:
PYTHONPATH=. python3 benchmarks/attention.py --impls xla,pallas_tpu
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import tempfile
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mosaicbert_jax.attention import alibi_slopes
from mosaicbert_jax.attention.cudnn import materialised_bias
from mosaicbert_jax.attention.pallas_gpu import (BlockSizes, default_block_sizes_for_head_dim,
                                                 flash_attention, flash_attention_qkv)
from mosaicbert_jax.attention.reference import xla_attention

# Block-size variants timed by --sweep (next to the default for each length).
CHECK_ROWS = 2
# Checked against the reference at every length (the baselines at the first one only).
OUR_KERNELS = ("pallas", "pallas_qkv_sliced", "pallas_qkv", "pallas_tpu", "triton")
SWEEP = {
    "large_blocks": dataclasses.asdict(BlockSizes()),
    "fwd128x128_w8": dict(block_q=128, block_k=128, num_warps=8),
    "bwd64x128_w8": dict(block_q_dkv=64, block_k_dkv=128, block_q_dq=128, block_k_dq=64,
                         num_warps_bwd=8),
    "blocks64": dict(block_q=64, block_k=64, block_q_dkv=64, block_k_dkv=64, block_q_dq=64,
                     block_k_dq=64),
    "always_mask": dict(unmasked_interior=False),
    # One kernel for the whole backward where one key block spans the sequence (<= 128).
    "one_pass": dict(one_pass_backward_max_seq=128),
    "one_pass_w8": dict(one_pass_backward_max_seq=128, num_warps_bwd=8),
    # At 128 tokens: one forward tile per row block, larger query blocks in the backward.
    "fwd128x128_w4": dict(block_q=128, block_k=128),
    "fwd128x64": dict(block_q=128, block_k=64),
    "one_pass_q64": dict(one_pass_backward_max_seq=128, block_q_dkv=64),
    "one_pass_q64_w8": dict(one_pass_backward_max_seq=128, block_q_dkv=64, num_warps_bwd=8),
    "one_pass_q128_w8": dict(one_pass_backward_max_seq=128, block_q_dkv=128, num_warps_bwd=8),
    "bwd32x128_dq128x32": dict(block_q_dkv=32, block_k_dkv=128, block_q_dq=128, block_k_dq=32),
    "stages2": dict(num_stages=2, num_stages_bwd=2),
    # delta = rowsum(dO * O) inside the dQ kernel instead of one XLA pass (the default).
    "delta_in_dq": dict(delta_in_dq_kernel=True),
    "stages1": dict(num_stages=1, num_stages_bwd=1),
}


def segment_layout(kind: str, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    ids = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        if kind == "one":
            ids[row] = 1
        elif kind == "two":
            ids[row, : seq // 2], ids[row, seq // 2:] = 1, 2
        elif kind == "packed":
            end = seq - (int(rng.integers(0, seq // 8)) if row % 2 else 0)
            pos, doc = 0, 1
            while pos < end:
                length = int(rng.integers(max(1, seq // 8), seq // 2 + 1))
                ids[row, pos:min(end, pos + length)] = doc
                pos, doc = pos + length, doc + 1
        else:
            raise ValueError(f"unknown layout {kind!r}; use one, two or packed")
    return ids


def visible_pairs(segment_ids: np.ndarray, window: int = 0) -> int:
    """Number of (query, key) pairs that share a non-padding segment (and, with window > 0,
    lie within |i - j| <= window), over all rows."""
    total = 0
    if window:
        pos = np.arange(segment_ids.shape[1])
        for row in segment_ids:
            for start in range(0, len(row), 1024):  # 1024 query rows at a time: bounded memory
                rows = slice(start, start + 1024)
                same = (row[rows, None] == row[None, :]) & (row[None, :] != 0)
                near = np.abs(pos[rows, None] - pos[None, :]) <= window
                total += int(np.count_nonzero(same & near))
        return total
    for row in segment_ids:
        _, counts = np.unique(row[row != 0], return_counts=True)
        total += int(np.sum(counts.astype(np.int64) ** 2))
    return total


def median_ms(fn: Callable, *args, target_s: float = 0.04, reps: int = 7) -> float:
    """Median wall time of one call (ms), timing batches of async calls between syncs."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - start
    calls = max(1, min(50, int(target_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return 1e3 * float(np.median(times))


def import_tokamax():
    """tokamax, importable with a stub for xprof (needed only by its own benchmarking)."""
    try:
        return importlib.import_module("tokamax")
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("xprof"):
            raise
    stub = tempfile.mkdtemp()
    os.makedirs(os.path.join(stub, "xprof", "cli"))
    for name, text in (("xprof/__init__.py", ""), ("xprof/cli/__init__.py", ""),
                       ("xprof/cli/tools.py", "get_kernel_stats_tool = None\n")):
        with open(os.path.join(stub, name), "w") as f:
            f.write(text)
    sys.path.append(stub)
    return importlib.import_module("tokamax")


@dataclasses.dataclass
class Case:
    name: str
    fn: Callable  # (q, k, v, segment_ids, bias) -> out
    needs_bias: bool = False
    # (qkv [batch, seq, 3, heads, head_dim], segment_ids, bias) -> out: if set, the timed
    # calls take one fused qkv (and give its gradient) instead of q, k, v.
    qkv_fn: Optional[Callable] = None

    def __post_init__(self):
        # Jitted once per case, so every layout of a length reuses the compiled program.
        self.forward = jax.jit(self.qkv_fn or self.fn)

        def forward_backward(q, k, v, s, b, d_out):
            _, vjp = jax.vjp(lambda q, k, v: self.fn(q, k, v, s, b), q, k, v)
            return vjp(d_out)

        def qkv_forward_backward(qkv, s, b, d_out):
            _, vjp = jax.vjp(lambda qkv: self.qkv_fn(qkv, s, b), qkv)
            return vjp(d_out)
        self.forward_backward = jax.jit(qkv_forward_backward if self.qkv_fn
                                        else forward_backward)


def qkv_case(name: str, qkv_fn: Callable) -> Case:
    """A case timed on one fused qkv; checked (fn) on q, k, v stacked into it."""
    return Case(name, lambda q, k, v, s, b: qkv_fn(jnp.stack([q, k, v], axis=2), s, b),
                qkv_fn=qkv_fn)


def implementations(args, slopes, scale) -> list[Case]:
    """The cases named by --impls, in that order (pallas block-size variants after pallas)."""
    tokamax = None
    cases = []
    for name in args.impls.split(","):
        if name == "xla":
            cases.append(Case("xla", lambda q, k, v, s, b: xla_attention(
                q, k, v, s, slopes, scale, window=args.window)))
        elif name == "cudnn":
            cases.append(Case("cudnn", lambda q, k, v, s, b: jax.nn.dot_product_attention(
                q, k, v, bias=b, scale=scale, implementation="cudnn"), needs_bias=True))
        elif name == "pallas":
            cases.append(Case("pallas", lambda q, k, v, s, b: flash_attention(
                q, k, v, s, slopes, scale, interpret=args.interpret, window=args.window)))
            cases += pallas_variants(args, slopes, scale) if args.sweep else []
        elif name == "pallas_qkv_sliced":
            cases.append(qkv_case(name, lambda qkv, s, b: flash_attention(
                qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], s, slopes, scale,
                interpret=args.interpret, window=args.window)))
        elif name == "pallas_qkv":
            cases.append(qkv_case(name, lambda qkv, s, b: flash_attention_qkv(
                qkv, s, slopes, scale, interpret=args.interpret, window=args.window)))
        elif name == "pallas_tpu":
            from mosaicbert_jax.attention.pallas_tpu import flash_attention_tpu
            cases.append(Case("pallas_tpu", lambda q, k, v, s, b: flash_attention_tpu(
                q, k, v, s, slopes, scale, interpret=args.interpret, window=args.window)))
        elif name == "triton":
            if args.window:
                print("triton skipped: the Triton kernel has no sliding window")
                continue
            from mosaicbert_jax.attention import triton_kernels
            try:  # report and go on: jax-triton is an optional extra
                triton_kernels.triton_language()
                triton_kernels.jax_triton()
            except ImportError as err:
                print(f"triton unavailable: {err}")
                continue
            triton_flash = triton_kernels.triton_flash_attention
            cases.append(Case("triton", lambda q, k, v, s, b, fn=triton_flash: fn(
                q, k, v, s, slopes, scale)))
        elif name.startswith("tokamax:"):
            try:
                tokamax = tokamax or import_tokamax()
            except Exception as err:  # report and go on: tokamax is an optional comparison
                print(f"tokamax unavailable: {type(err).__name__}: {err}")
                continue
            impl = name.split(":")[1]
            cases.append(Case(f"tokamax-{impl}", lambda q, k, v, s, b, impl=impl, lib=tokamax:
                              lib.dot_product_attention(q, k, v, bias=b, scale=scale,
                                                        implementation=impl),
                              needs_bias=True))
        else:
            raise ValueError(f"unknown implementation {name!r}")
    return cases


def pallas_variants(args, slopes, scale) -> list[Case]:
    cases = []
    for name in args.sweep_variants.split(","):
        def variant(q, k, v, s, b, overrides=SWEEP[name]):
            defaults = default_block_sizes_for_head_dim(q.shape[1], q.shape[-1])
            sizes = dataclasses.replace(defaults, **overrides)
            return flash_attention(q, k, v, s, slopes, scale,
                                   block_sizes=sizes.shrunk_to(q.shape[1]),
                                   interpret=args.interpret, window=args.window)
        cases.append(Case(f"pallas[{name}]", variant))
    return cases


def relative_error(got, want) -> float:
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def outputs_and_grads(fn, q, k, v, seg, d_out):
    """Output and dq, dk, dv of sum(out * d_out), with padding query rows zeroed."""
    real = (seg != 0)[:, :, None, None]

    def masked(q, k, v):
        return jnp.where(real, fn(q, k, v), 0).astype(jnp.float32)

    out, vjp = jax.vjp(masked, q, k, v)
    return (out, *vjp(d_out))


def reference_outputs(q, k, v, seg, slopes, scale, d_out, window: int = 0):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return jax.jit(lambda q, k, v: outputs_and_grads(
        lambda *a: xla_attention(*a, seg, slopes, scale, window=window), q, k, v, seg,
        d_out))(*f32)


def check(case: Case, q, k, v, seg, bias, d_out, want) -> str:
    """Relative errors of output and dq, dk, dv against the fp32 reference (`want`)."""
    got = jax.jit(lambda q, k, v: outputs_and_grads(
        lambda *a: case.fn(*a, seg, bias), q, k, v, seg, d_out))(q, k, v)
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    bad = any(not np.isfinite(e) or e > 2e-2 for e in errors)
    return " ".join(f"{e:.1e}" for e in errors) + ("  <-- FAIL" if bad else "")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="128,512,1024,2048")
    parser.add_argument("--tokens", type=int, default=32768, help="batch * seq per call")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layouts", default="one,two,packed")
    parser.add_argument("--impls", default="xla,cudnn,pallas,pallas_qkv_sliced,pallas_qkv,"
                        "tokamax:mosaic,tokamax:triton")
    parser.add_argument("--sweep", action="store_true", help="also time block-size variants")
    parser.add_argument("--sweep-seq-lens", default="128,1024")
    parser.add_argument("--sweep-variants", default=",".join(SWEEP))
    parser.add_argument("--window", type=int, default=0,
                        help="sliding window: keys with |i - j| <= W only (0 = full attention)")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--interpret", action="store_true",
                        help="run the Pallas kernels in the interpreter (CPU smoke test)")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    print(f"device: {device.device_kind}; jax {jax.__version__}; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    dtype = jnp.bfloat16
    slopes = jnp.asarray(alibi_slopes(args.heads))
    scale = args.head_dim ** -0.5
    all_cases = implementations(args, slopes, scale)
    rng = np.random.default_rng()
    rows = []
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    for seq in seq_lens:
        batch = max(1, args.tokens // seq)
        shape = (batch, seq, args.heads, args.head_dim)
        q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
        qkv = jnp.stack([q, k, v], axis=2) if any(c.qkv_fn for c in all_cases) else None
        cases = [c for c in all_cases if not c.name.startswith("pallas[")
                 or str(seq) in args.sweep_seq_lens.split(",")]
        for layout in args.layouts.split(","):
            seg_np = segment_layout(layout, batch, seq, rng)
            seg = jnp.asarray(seg_np)
            pairs = visible_pairs(seg_np, args.window)
            flops_fwd = 4.0 * args.heads * args.head_dim * pairs
            bias = (materialised_bias(seg, slopes, seq, dtype, args.window)
                    if any(c.needs_bias for c in cases) else None)
            checking = not args.no_check
            # Checked on the first rows only (one ends in padding): cheap fp32 reference.
            rows_checked = [x[:CHECK_ROWS] for x in (q, k, v, seg, d_out.astype(jnp.float32))]
            want = reference_outputs(*rows_checked[:4], slopes, scale, rows_checked[4],
                                     args.window) if checking else None
            for case in cases:
                b = bias if case.needs_bias else None
                # Our kernel is checked at every length, the baselines at the first one.
                checked = checking and (case.name in OUR_KERNELS or seq == seq_lens[0])
                try:
                    b_checked = None if b is None else b[:CHECK_ROWS]
                    errors = check(case, *rows_checked[:4], b_checked, rows_checked[4],
                                   want) if checked else ""
                    inputs = (qkv,) if case.qkv_fn else (q, k, v)
                    t_fwd = median_ms(case.forward, *inputs, seg, b)
                    t_all = median_ms(case.forward_backward, *inputs, seg, b, d_out)
                except Exception as err:  # one failing baseline must not end the run
                    print(f"{case.name} S={seq} {layout}: FAILED {type(err).__name__}: "
                          f"{str(err)[:300]}", flush=True)
                    continue
                row = dict(layout=layout, seq=seq, batch=batch, impl=case.name, window=args.window,
                           visible=pairs / (batch * seq * seq), fwd_ms=t_fwd, fwd_bwd_ms=t_all,
                           fwd_tflops=flops_fwd / t_fwd / 1e9,
                           fwd_bwd_tflops=3.5 * flops_fwd / t_all / 1e9, errors=errors)
                rows.append(row)
                print(f"{layout:>6} S={seq:<5} B={batch:<4} {case.name:<24} fwd {t_fwd:7.3f} ms"
                      f"  fwd+bwd {t_all:7.3f} ms  {row['fwd_bwd_tflops']:6.1f} TFLOP/s"
                      f"  err(o,dq,dk,dv) {errors}", flush=True)
            del bias, want, rows_checked
        del qkv
    table = markdown_table(rows, device.device_kind, args)
    print("\n" + table)
    with open(args.results, "w") as f:
        f.write(table)
    with open(os.path.splitext(args.results)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)


def markdown_table(rows, device_kind: str, args) -> str:
    cudnn = {(r["layout"], r["seq"]): r["fwd_bwd_ms"] for r in rows if r["impl"] == "cudnn"}
    lines = [
        f"# Attention benchmark ({device_kind}, {time.strftime('%Y-%m-%d')}, jax "
        f"{jax.__version__})", "",
        f"bf16, {args.heads} heads of {args.head_dim}, batch x seq = {args.tokens} tokens"
        + (f", sliding window {args.window}" if args.window else "") + ". "
        "TFLOP/s count only visible (query, key) pairs (layouts two/packed mask the rest); "
        "forward+backward counts 3.5x the forward. cuDNN/tokamax get a materialised bias "
        "built outside the timed call.", "",
        "| layout | seq | batch | visible | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s "
        "| fwd+bwd TFLOP/s | cudnn / this (fwd+bwd) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = cudnn.get((r["layout"], r["seq"]))
        ratio = f"{base / r['fwd_bwd_ms']:.2f}x" if base else ""
        lines.append(f"| {r['layout']} | {r['seq']} | {r['batch']} | {r['visible']:.0%} "
                     f"| {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
                     f"| {r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
