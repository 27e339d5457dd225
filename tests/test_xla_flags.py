"""XLA flag defaults: added where missing, never overriding what the user set."""

import os
import subprocess
import sys

from mosaicbert_jax.xla_flags import GPU_DEFAULTS, with_defaults


def test_defaults_are_appended_to_empty_flags():
    flags = with_defaults("", {"--xla_a": "", "--xla_b": "3"})
    assert flags == "--xla_a= --xla_b=3"


def test_user_setting_wins_and_other_flags_are_kept():
    flags = with_defaults("--xla_dump_to=/tmp/d --xla_a=true", {"--xla_a": "", "--xla_b": "3"})
    assert flags.split() == ["--xla_dump_to=/tmp/d", "--xla_a=true", "--xla_b=3"]


def test_gpu_defaults_are_flags_this_xla_accepts():
    """XLA aborts on unknown flags: every default must parse in this jaxlib (CPU included)."""
    code = "import jax.numpy as jnp; print(float(jnp.ones(2).sum()))"
    env = dict(os.environ, XLA_FLAGS=with_defaults("", GPU_DEFAULTS), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "2.0"
