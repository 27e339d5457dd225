"""The hash dropout: keep rate, independence, unbiasedness, its recomputed gradient, the module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicbert_jax import MosaicBertConfig
from mosaicbert_jax.dropout import Dropout, hash_dropout, keep_mask

SEED = jnp.array([12345, 678], jnp.uint32)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_matches(rate):
    kept = np.asarray(keep_mask(SEED, (1000, 1024), rate))
    # 1M Bernoulli draws: the standard error is below 5e-4.
    assert abs(kept.mean() - (1 - rate)) < 2.5e-3


def test_masks_are_independent_across_seeds_and_neighbours():
    rate = 0.1
    a = ~np.asarray(keep_mask(SEED, (1000, 1024), rate)).ravel()
    b = ~np.asarray(keep_mask(SEED + 1, (1000, 1024), rate)).ravel()
    assert (a != b).any()
    for both in [(a & b).mean(), (a[1:] & a[:-1]).mean(), (a[1024:] & a[:-1024]).mean()]:
        assert abs(both - rate ** 2) < 1e-3


def test_same_seed_same_mask():
    x = jnp.ones((8, 96), jnp.float32)
    np.testing.assert_array_equal(hash_dropout(x, SEED, 0.1), hash_dropout(x, SEED, 0.1))


def test_dropout_is_unbiased_and_scales_kept_values():
    x = jnp.full((512, 1024), 3.0, jnp.float32)
    y = np.asarray(hash_dropout(x, SEED, 0.1))
    kept = np.unique(y[y != 0])
    assert len(kept) == 1 and abs(kept[0] / (3.0 / 0.9) - 1) < 1e-5  # 40 float32 ulps
    assert abs(y.mean() - 3.0) < 0.01


def test_gradient_is_the_same_mask_times_scale():
    x = jax.random.normal(jax.random.key(0), (16, 384), jnp.float32)
    weights = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
    grad = jax.grad(lambda v: (hash_dropout(v, SEED, 0.25) * weights).sum())(x)
    mask = np.asarray(keep_mask(SEED, x.shape, 0.25))
    np.testing.assert_allclose(grad, np.where(mask, weights / 0.75, 0.0), rtol=1e-6)
    # And jitted, with the seed traced, as inside the train step.
    jit_grad = jax.jit(jax.grad(lambda v, s: (hash_dropout(v, s, 0.25) * weights).sum()))
    np.testing.assert_allclose(jit_grad(x, SEED), grad, rtol=1e-6)


def test_bfloat16_input_stays_bfloat16():
    y = hash_dropout(jnp.ones((4, 64), jnp.bfloat16), SEED, 0.1)
    assert y.dtype == jnp.bfloat16


def test_module_identity_when_deterministic_or_rate_zero():
    x = jnp.arange(24.0).reshape(4, 6)
    np.testing.assert_array_equal(Dropout(0.1).apply({}, x, True), x)
    np.testing.assert_array_equal(
        Dropout(0.0).apply({}, x, False, rngs={"dropout": jax.random.key(0)}), x)


def test_module_threefry_matches_flax_dropout():
    x = jnp.ones((32, 32))
    rngs = {"dropout": jax.random.key(3)}
    ours = Dropout(0.3, rng="threefry").apply({}, x, False, rngs=rngs)
    np.testing.assert_array_equal(ours, nn.Dropout(0.3).apply({}, x, False, rngs=rngs))


def test_module_draws_a_fresh_mask_per_key():
    x = jnp.ones((32, 64))
    one = Dropout(0.1).apply({}, x, False, rngs={"dropout": jax.random.key(1)})
    two = Dropout(0.1).apply({}, x, False, rngs={"dropout": jax.random.key(2)})
    assert (np.asarray(one) != np.asarray(two)).any()


def test_unknown_dropout_rng_is_rejected():
    with pytest.raises(ValueError, match="dropout_rng='philox'"):
        MosaicBertConfig.tiny(dropout_rng="philox")
    with pytest.raises(ValueError, match="'philox'"):
        Dropout(0.1, rng="philox").apply({}, jnp.ones(3), False,
                                         rngs={"dropout": jax.random.key(0)})


def test_bad_rate_and_oversized_arrays_are_clear_errors():
    with pytest.raises(ValueError, match=r"rate=1.5 must be in \[0, 1\]"):
        Dropout(1.5).apply({}, jnp.ones(3), False, rngs={"dropout": jax.random.key(0)})
    # Rate 1 drops everything, as nn.Dropout does.
    np.testing.assert_array_equal(
        Dropout(1.0).apply({}, jnp.ones(3), False, rngs={"dropout": jax.random.key(0)}), 0.0)
    # 2**33 rows: refused before anything is allocated.
    with pytest.raises(ValueError, match="exceeds the 2\\*\\*32 row/column counters"):
        keep_mask(SEED, (2 ** 17, 2 ** 16, 2), 0.1)
