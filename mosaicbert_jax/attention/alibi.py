"""ALiBi slopes as the MosaicBERT reference computes them."""

from __future__ import annotations

import math

import numpy as np


def _power_of_two_slopes(n: int) -> list[float]:
    return [2.0 ** (-8.0 * (k + 1) / n) for k in range(n)]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head slopes m_h; the bias is -m_h * |i - j|.

    For a power of two n: 2^(-8(k+1)/n). Otherwise the list for m = 2^floor(log2 n)
    followed by every other slope of the list for 2m until n slopes.
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads={num_heads} must be positive")
    m = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = _power_of_two_slopes(m)
    if m != num_heads:
        slopes += _power_of_two_slopes(2 * m)[0::2][: num_heads - m]
    return np.asarray(slopes, dtype=np.float32)
