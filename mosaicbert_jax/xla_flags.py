"""XLA GPU flags that measurably speed up MosaicBERT training, applied by our commands.

XLA reads XLA_FLAGS once, when JAX first initialises its backend, so `apply_gpu_defaults`
must run before any computation; the train and GLUE commands and the benchmarks call it at
start. A flag the user already put in XLA_FLAGS is left as they set it. Measurements are in
benchmarks/RESULTS.md (benchmarks/xla_flags.py times each flag in its own process).
"""

from __future__ import annotations

import importlib.util
import os

# flag -> value. Command buffers (CUDA graphs) made the base train step 2.5 ms slower (66.4 vs
# 63.9 ms at 256 x 128 on an H100, JAX 0.11.2): the step is long, so launch overhead is not
# what they would save, and their updates cost. On the FP8 step (H200, 2026-12-02) they gave
# 40.8 against 41.1 ms on one machine and 41.4 against 41.2 on another: no reliable gain.
GPU_DEFAULTS = {"--xla_gpu_enable_command_buffer": ""}

_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda12",
                 "jax_plugins.xla_cuda13")


def has_cuda_plugin() -> bool:
    """True where JAX can run on NVIDIA GPUs (a CUDA plugin is installed)."""
    for name in _CUDA_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # parent package missing
            continue
    return False


def with_defaults(flags: str, defaults: dict[str, str]) -> str:
    """`flags` plus every default whose flag name does not already appear in it."""
    present = {item.split("=", 1)[0] for item in flags.split()}
    extra = [f"{name}={value}" for name, value in defaults.items() if name not in present]
    return " ".join([flags.strip(), *extra]).strip()


def apply_gpu_defaults() -> None:
    """Adds GPU_DEFAULTS to XLA_FLAGS on machines with a CUDA plugin (no effect elsewhere)."""
    if has_cuda_plugin():
        os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""), GPU_DEFAULTS)
