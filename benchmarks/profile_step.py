"""Where the GPU time of one train step goes, kernel by kernel (jax.profiler trace, no TensorBoard).

  PYTHONPATH=. python benchmarks/profile_step.py --case base:128:256 --attention pallas

Traces a few steps of the trainer's own train step (train_throughput.build_train_step), reads
the trace with jax.profiler.ProfileData and prints GPU time per step by kernel category and
the top kernels, so optimisation targets are measured rather than guessed. With --fp8 it
profiles the FP8 model (model.fp8) and first counts the GEMM custom calls of the compiled step:
`__cublas$lt$matmul$f8` ones are the FP8 GEMMs XLA's GemmRewriter made of our float8 dots:
12 per layer with --fp8-gemm encoder (the default: all 4 dense layers x forward, input grad,
kernel grad: 143 in the compiled base step), 6 with mlp (the MLP's 2 dense layers).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile

import jax

from mosaicbert_jax.fp8 import GEMMS as FP8_GEMMS
from mosaicbert_jax.xla_flags import apply_gpu_defaults
from kernel_tiles import add_tile_flags, apply_tile_flags
from train_throughput import build_train_step

CATEGORIES = [  # first match wins; matched against the lower-cased kernel name
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "dot")),
    ("fused glu/layernorm (pallas)", ("glu_dropout", "layernorm_fwd", "layernorm_bwd")),
    ("attention (pallas/triton)", ("mha", "flash", "attention", "pallas", "_fwd", "_bwd")),
    ("reduction fusion", ("reduce", "reduction")),
    ("copy/transpose", ("copy", "transpose", "concatenate", "dynamic_update", "slice")),
    ("elementwise fusion", ("fusion", "loop_", "elementwise")),
    ("memset/memcpy", ("memset", "memcpy")),
]


GEMM_TARGETS = ("__cublas$lt$matmul$f8", "__cublas$lt$matmul", "__cublas$gemm")


def gemm_custom_calls(hlo_text: str) -> dict[str, int]:
    """How many custom calls of each cuBLAS GEMM target the compiled HLO text holds."""
    return {target: hlo_text.count(f'custom_call_target="{target}"') for target in GEMM_TARGETS}


def category(name: str) -> str:
    lower = name.lower()
    for label, needles in CATEGORIES:
        if any(n in lower for n in needles):
            return label
    return "other"


def gpu_kernel_events(trace_dir: str):
    """(name, duration_ms, start_ns, end_ns) of every kernel on the first GPU's stream lines."""
    from jax.profiler import ProfileData
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
    data = ProfileData.from_file(paths[0])
    plane = data.find_plane_with_name("/device:GPU:0")
    if plane is None:
        raise RuntimeError(f"no /device:GPU:0 plane; planes: {[p.name for p in data.planes]}")
    events = []
    for line in plane.lines:
        if not line.name.lower().startswith("stream"):
            continue
        for event in line.events:
            events.append((event.name, event.duration_ns / 1e6, event.start_ns, event.end_ns))
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="base:128:256", help="preset:seq_len:batch")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--dropout-rng", default="hash")
    parser.add_argument("--fused", default="auto", help="fused-op implementation: auto, xla, pallas")
    add_tile_flags(parser)
    parser.add_argument("--fp8", action="store_true",
                        help="profile the FP8 model (model.fp8) and count its FP8 GEMMs")
    parser.add_argument("--fp8-gemm", default="encoder", choices=FP8_GEMMS,
                        help="with --fp8: model.fp8_gemm")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--by-calls", type=int, default=0,
                        help="also list the N kernels launched most often per step (small "
                             "per-tensor ops show up here, not among the longest)")
    parser.add_argument("--hlo-out", default="", help="also write the compiled step's HLO here")
    args = parser.parse_args()
    apply_gpu_defaults()  # profile what the train command runs
    apply_tile_flags(parser, args)
    preset, seq, batch = args.case.split(":")
    step, state, batches, _, _ = build_train_step(preset, int(seq), int(batch), args.attention,
                                                  {"data": 1, "fsdp": -1, "tensor": 1},
                                                  dropout_rng=args.dropout_rng,
                                                  fused=args.fused,
                                                  model_overrides={"fp8": args.fp8,
                                                                   "fp8_gemm": args.fp8_gemm})
    if args.hlo_out or args.fp8:
        hlo_text = step.lower(state, batches[0]).compile().as_text()
        if args.hlo_out:  # to look up what each top fusion computes
            with open(args.hlo_out, "w") as f:
                f.write(hlo_text)
        print("GEMM custom calls in the compiled step: " + ", ".join(
            f"{target} {count}" for target, count in gemm_custom_calls(hlo_text).items()))
    for i in range(3):  # compile and warm up outside the trace
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics)
    trace_dir = tempfile.mkdtemp(prefix="mosaicbert_trace_")
    with jax.profiler.trace(trace_dir):
        for i in range(args.steps):
            state, metrics = step(state, batches[i % 4])
        jax.block_until_ready(metrics)
    events = gpu_kernel_events(trace_dir)
    per_step = 1.0 / args.steps
    by_cat, by_name, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for name, ms, _, _ in events:
        by_cat[category(name)] += ms * per_step
        by_name[name] += ms * per_step
        counts[name] += 1
    total = sum(by_cat.values())
    print(f"\n{args.case} attention={args.attention} dropout={args.dropout_rng} "
          f"fused={args.fused} fp8={args.fp8 and args.fp8_gemm} on "
          f"{jax.devices()[0].device_kind}: {total:.1f} ms of kernels per step, "
          f"{len(events) / args.steps:.0f} kernels per step")
    span_ms = (max(e[3] for e in events) - min(e[2] for e in events)) / 1e6 * per_step
    print(f"GPU span {span_ms:.1f} ms per step: {span_ms - total:.2f} ms with no kernel running "
          f"(launch gaps; kernels on several streams would overlap instead)")
    print("| category | ms/step | share |\n| --- | --- | --- |")
    for label, ms in by_cat.most_common():
        print(f"| {label} | {ms:.2f} | {ms / total:.1%} |")
    print("\n| top kernels | calls/step | ms/step |\n| --- | --- | --- |")
    for name, ms in by_name.most_common(args.top):
        print(f"| {name[:110]} | {counts[name] / args.steps:.0f} | {ms:.2f} |")
    if args.by_calls:
        print("\n| most launched kernels | calls/step | ms/step |\n| --- | --- | --- |")
        for name, calls in counts.most_common(args.by_calls):
            print(f"| {name[:110]} | {calls / args.steps:.0f} | {by_name[name]:.2f} |")


if __name__ == "__main__":
    main()
