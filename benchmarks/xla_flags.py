"""Times the train step under sets of XLA GPU flags, each in a fresh process, one table.

  PYTHONPATH=. python benchmarks/xla_flags.py --case base:128:256 --attention pallas

XLA reads XLA_FLAGS once per process, so every variant runs benchmarks/train_throughput.py
in its own subprocess (no PyTorch reference, and without the flags mosaicbert_jax/xla_flags.py
adds, so "default" is XLA's own defaults). A flag this XLA does not know aborts only its
own row, reported as failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

VARIANTS = {
    "default": "",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    "no_command_buffer": "--xla_gpu_enable_command_buffer=",
    # CUDA graphs of XLA's own kernels only (our Pallas kernels are custom calls).
    "command_buffer_no_custom_calls": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT",
    "autotune_5": "--xla_gpu_autotune_level=5",
}


def run_variant(flags: str, case: str, attention: str, steps: int) -> dict | None:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_throughput.py")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        proc = subprocess.run([sys.executable, script, "--cases", case, "--attention", attention,
                               "--steps", str(steps), "--no-torch", "--no-xla-defaults",
                               "--json", out.name],
                              env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or os.path.getsize(out.name) == 0:
            print(f"  failed ({proc.returncode}): {proc.stderr.strip()[-400:]}", flush=True)
            return None
        with open(out.name) as f:
            result = json.load(f)
    return result["rows"][0] if result["rows"] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="base:128:256")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list from {sorted(VARIANTS)}")
    args = parser.parse_args()
    rows = []
    for name in args.variants.split(","):
        print(f"{name}: XLA_FLAGS+={VARIANTS[name]!r}", flush=True)
        rows.append((name, run_variant(VARIANTS[name], args.case, args.attention, args.steps)))
    print(f"\n| XLA flags ({args.case}, {args.attention}) | step ms | tokens/s |")
    print("| --- | --- | --- |")
    for name, r in rows:
        text = f"{r['step_ms']:.1f} | {r['tokens_per_s_per_device']:,.0f}" if r else "failed | -"
        print(f"| {name} `{VARIANTS[name]}` | {text} |")


if __name__ == "__main__":
    main()
