"""The XLA settings every test process runs with, in-process (conftest.py) and in the
subprocesses tests start: LLVM at -O0 without its expensive passes. The tests' programs are
tiny, so compiling is most of their time and running them hardly counts; -O0 cut the suite's
CPU time by about a quarter. It changes no arithmetic (no fast-math either way), only how
well the same operations are scheduled, so no test result depends on it."""

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS holding `flags` (e.g. a fake device count) and the fast-compile flags."""
    words = " ".join(flags).split()
    return " ".join(words + [f for f in FAST_COMPILE_FLAGS if f not in words])
