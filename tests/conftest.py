"""Shared test setup: CPU only, fast-compile XLA flags (cpu_env.py), float32 matmuls at full
precision, and one persistent JAX compilation cache for the whole session (the pytest-xdist
workers and the training subprocesses the tests start), so a program compiled once is not
compiled again by the next process that runs it. The cache holds the same executables a
fresh compile gives, so no result depends on it; it is a fresh temp dir per session,
removed at exit."""

import atexit
import os
import shutil
import tempfile

from cpu_env import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))  # see cpu_env.py

TEST_CACHE_VAR = "JAX_COMPILATION_CACHE_DIR"
if TEST_CACHE_VAR not in os.environ:  # the first process of the session (xdist's controller)
    os.environ[TEST_CACHE_VAR] = tempfile.mkdtemp(prefix="mosaicbert_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ[TEST_CACHE_VAR], True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


