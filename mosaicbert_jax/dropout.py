"""Dropout whose mask is a keyed hash of each element's position, recomputed in the backward.

Flax's `nn.Dropout` draws a threefry value per element and autodiff stores the boolean mask
for the backward. MosaicBERT-base drops 1.5G elements a step (the 3072-wide GLU output is
dropped too), which made random bits about 10% of an H100 step. Here the mask is a pure
function of (seed, element position), a few integer multiplies per element: it fuses into the
neighbouring elementwise kernels in the forward and is recomputed in the backward, so no
mask is ever written to memory. Elements are kept with probability 1 - rate (to 2**-32) and
scaled by 1 / (1 - rate) in float32, so the layer is unbiased in expectation.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mosaicbert_jax.config import DROPOUT_RNGS


_M1, _M2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)
_GOLDEN = np.uint32(0x9E3779B9)  # odd, so column * _GOLDEN is a bijection of the column


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (xorshift-multiply, 'lowbias32'): a bijection with low bias."""
    x = x ^ (x >> 16)
    x = x * _M1
    x = x ^ (x >> 15)
    x = x * _M2
    return x ^ (x >> 16)


def _row_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 row-major index over all axes but the last, broadcast along the last axis.

    Built from iotas, so it stays correct when XLA partitions the array across devices.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape) - 1)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return index


def _threshold(rate: float) -> np.uint32:
    return np.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


def keep_from_position(row: jax.Array, column: jax.Array, seed0: jax.Array, seed1: jax.Array,
                       rate: float) -> jax.Array:
    """True where the element at (row, column) is kept: uint32 positions (broadcastable),
    seed words seed0/seed1. The one definition of the mask, shared by `keep_mask` and the
    fused kernels (mosaicbert_jax/fused), so every path drops the same elements."""
    row_hash = _mix32(row ^ seed0)
    bits = _mix32(row_hash ^ (column * _GOLDEN + seed1))
    return bits >= _threshold(rate)


def keep_mask(seed: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask of `shape`, True with probability 1 - rate, a function of `seed` (uint32[2]).

    Each element hashes its (row, column) position, rows being all axes but the last, so
    arrays of any size (well past 2**32 elements) get a distinct input per element.
    """
    rows = int(np.prod(shape[:-1]))
    if rows > 2 ** 32 or (shape and shape[-1] > 2 ** 32):
        raise ValueError(f"dropout over shape {shape} exceeds the 2**32 row/column counters; "
                         "reshape it or use dropout_rng='threefry'")
    seed = seed.astype(jnp.uint32)
    column = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1) if shape else 0
    return keep_from_position(_row_index(shape), column, seed[0], seed[1], rate)


def _apply(x: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
    scaled = (x.astype(jnp.float32) * np.float32(1.0 / (1.0 - rate))).astype(x.dtype)
    return jnp.where(keep_mask(seed, x.shape, rate), scaled, jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def hash_dropout(x: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
    """Zeroes elements of x with probability `rate` and scales the rest by 1 / (1 - rate)."""
    return _apply(x, seed, rate)


def _hash_dropout_fwd(x, seed, rate):
    return _apply(x, seed, rate), seed


def _hash_dropout_bwd(rate, seed, grad):
    # The same mask, recomputed from the seed: nothing but the two seed words is saved. The
    # barrier stops XLA from merging this with the forward's identical mask expression, which
    # would turn the recomputation back into a stored boolean mask.
    seed = jax.lax.optimization_barrier(seed)
    return _apply(grad, seed, rate), None


hash_dropout.defvjp(_hash_dropout_fwd, _hash_dropout_bwd)


class Dropout(nn.Module):
    """Drop-in for `nn.Dropout` (same 'dropout' rng stream) with a choice of mask source.

    `rng="hash"` (default) uses `hash_dropout`; `rng="threefry"` computes what `nn.Dropout`
    does (a threefry Bernoulli mask, kept by autodiff for the backward).
    """

    rate: float
    rng: str = "hash"

    def _check(self) -> None:
        if self.rng not in DROPOUT_RNGS:
            raise ValueError(f"dropout rng {self.rng!r} is not one of {DROPOUT_RNGS}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"dropout rate={self.rate} must be in [0, 1]")

    def hash_seed(self, deterministic: bool) -> tuple[jax.Array, float]:
        """(seed, rate) for a fused kernel that applies this layer's hash dropout itself:
        the seed `__call__` would draw, and rate 0 when nothing is dropped."""
        self._check()
        if self.rng != "hash" or self.rate >= 1.0:
            raise ValueError(f"fused dropout needs rng='hash' and rate < 1; got rng="
                             f"{self.rng!r}, rate={self.rate}")
        if deterministic or self.rate == 0.0:
            return jnp.zeros((2,), jnp.uint32), 0.0
        return jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32), float(self.rate)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        self._check()
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:  # as nn.Dropout: everything dropped
            return jnp.zeros_like(x)
        key = self.make_rng("dropout")
        if self.rng == "threefry":  # what nn.Dropout computes
            keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
            return jax.lax.select(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
        return hash_dropout(x, jax.random.bits(key, (2,), jnp.uint32), float(self.rate))
