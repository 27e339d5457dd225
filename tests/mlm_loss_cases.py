"""bf16 comparisons shared by tests/test_mlm_loss.py and benchmarks/check_mlm_loss.py."""

import jax
import numpy as np

BF16_STEP = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding moves a value <= 2^-9 of it


def bf16_ulps_apart(a, b) -> np.ndarray:
    """Per element, how many bf16 values lie between a and b (0 for +0 and -0): the bit
    patterns mapped to a monotone integer line."""
    def line(x):
        bits = np.asarray(jax.device_get(x)).view(np.uint16).astype(np.int32)
        return np.where(bits & 0x8000, 0x8000 - bits, bits)  # -0 -> 0, negatives below
    return np.abs(line(a) - line(b))
