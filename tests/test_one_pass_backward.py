"""The one-pass attention backward of the Pallas GPU kernel (interpreter on CPU): for a
sequence that one key block spans, the dK/dV kernel also writes dQ and the dQ kernel does not
run. Checked against the float64 reference, forward and gradients, separate and fused-QKV
entries, fp32 and bf16, with and without a window, on fresh random packed layouts (rows of
only padding among them: their dQ must come out zero, not stale); it gives what the
two-kernel backward gives; it is taken only where it applies; it passes the Triton lowering
for CUDA as two kernels, not three.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import check_random_packed_layouts, fresh_rng, random_packed_layouts
from mosaicbert_jax.attention import alibi_slopes
from mosaicbert_jax.attention.pallas_gpu import (BlockSizes, flash_attention,
                                                 flash_attention_qkv, uses_one_pass_backward)

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                   block_k_dq=16)
ONE_PASS = dataclasses.replace(SMALL, one_pass_backward_max_seq=128)
BF16_TOLERANCES = dict(forward_tolerance=2e-2, gradient_tolerance=3e-2)


def _separate(sizes, window):
    return lambda q, k, v, s, slopes, scale: flash_attention(
        q, k, v, s, slopes, scale, block_sizes=sizes, interpret=True, window=window)


def _fused(sizes, window):
    return lambda q, k, v, s, slopes, scale: flash_attention_qkv(
        jnp.stack([q, k, v], axis=2), s, slopes, scale, block_sizes=sizes, interpret=True,
        window=window)


# 100 pads to 128 and 50 to 64 (powers of two: one pass); the default 64-blocks at 128.
@pytest.mark.parametrize("entry,dtype,seq,window,sizes", [
    (_separate, jnp.float32, 100, 0, ONE_PASS),
    (_fused, jnp.float32, 50, 9, dataclasses.replace(ONE_PASS, unmasked_interior=False)),
    (_fused, jnp.bfloat16, 128, 0, BlockSizes(block_q=64, block_k=64, block_q_dkv=32,
                                              block_k_dkv=64, block_q_dq=64, block_k_dq=32,
                                              one_pass_backward_max_seq=128)),
    (_separate, jnp.bfloat16, 100, 33, ONE_PASS),
])
def test_one_pass_backward_matches_float64_reference(entry, dtype, seq, window, sizes):
    tolerances = BF16_TOLERANCES if dtype == jnp.bfloat16 else {}
    check_random_packed_layouts(entry(sizes, window), seq, draws=2, batch=3, heads=2,
                                head_dim=16, dtype=dtype, window=window,
                                name=f"one pass {entry.__name__}", **tolerances)


def test_one_pass_gives_the_two_kernel_gradients():
    """Same inputs through both backwards: equal up to float32 summation order (the one pass
    sums dQ over all keys in one dot, the dQ kernel over 16-key blocks)."""
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 3, 64, 2, 16
    segment_ids = jnp.asarray(random_packed_layouts(rng, batch, seq))
    qkv = jnp.asarray(rng.standard_normal((batch, seq, 3, heads, head_dim)), jnp.float32)
    d_out = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32)
    slopes = jnp.asarray(alibi_slopes(heads))
    grads = {}
    for name, sizes in (("two kernels", SMALL), ("one pass", ONE_PASS)):
        _, vjp = jax.vjp(lambda x: flash_attention_qkv(x, segment_ids, slopes, 0.25,
                                                       block_sizes=sizes, interpret=True), qkv)
        grads[name] = np.asarray(jax.jit(vjp)(d_out)[0])
    scale = np.abs(grads["two kernels"]).max()
    np.testing.assert_allclose(grads["one pass"], grads["two kernels"], rtol=0,
                               atol=1e-5 * scale, err_msg=f"seed {seed}")


def test_one_pass_applies_only_to_power_of_two_lengths_within_its_limit():
    assert uses_one_pass_backward(128, ONE_PASS) and uses_one_pass_backward(64, ONE_PASS)
    assert not uses_one_pass_backward(96, ONE_PASS)    # no 96-token Triton tile
    assert not uses_one_pass_backward(256, ONE_PASS)   # beyond the limit
    assert not uses_one_pass_backward(128, SMALL)      # off by default


@pytest.mark.parametrize("seq,kernels", [(128, 2), (256, 3)])
def test_one_pass_lowers_for_cuda_as_two_kernels(seq, kernels):
    """Forward + one-pass backward pass the Triton lowering (what a GPU compile starts with)
    as two kernels; at 256 tokens, beyond the limit, the usual three."""
    batch, heads, head_dim = 2, 2, 64
    qkv = jnp.zeros((batch, seq, 3, heads, head_dim), jnp.bfloat16)
    segment_ids = jnp.ones((batch, seq), jnp.int32)
    slopes = jnp.asarray(alibi_slopes(heads))
    sizes = BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_k_dkv=64,
                       block_q_dq=64, block_k_dq=32, one_pass_backward_max_seq=128)

    def step(qkv):
        out, vjp = jax.vjp(lambda x: flash_attention_qkv(x, segment_ids, slopes, 0.125,
                                                         block_sizes=sizes), qkv)
        return out, vjp(out)[0]

    text = jax.jit(step).trace(qkv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == kernels
    assert ("alibi_flash_bwd_one_pass" in text) == (kernels == 2)


def test_block_overrides_reach_the_default_sizes_and_reject_unknown_fields():
    from mosaicbert_jax.attention import pallas_gpu
    overrides = pallas_gpu.parse_block_overrides("one_pass_backward_max_seq=128,num_warps_bwd=8")
    assert overrides == {"one_pass_backward_max_seq": 128, "num_warps_bwd": 8}
    try:
        pallas_gpu.set_block_overrides(overrides)
        sizes = pallas_gpu.default_block_sizes_for_head_dim(128, 64)
        assert uses_one_pass_backward(128, sizes) and sizes.num_warps_bwd == 8
        assert sizes.block_k_dkv == 64   # the length-dependent shrinking still applies
    finally:
        pallas_gpu.set_block_overrides({})
    assert not uses_one_pass_backward(128, pallas_gpu.default_block_sizes_for_head_dim(128, 64))
    with pytest.raises(ValueError, match="'one_pass=1' is not field=int"):
        pallas_gpu.parse_block_overrides("one_pass=1")
    with pytest.raises(ValueError, match="'num_warps_bwd=x' is not field=int"):
        pallas_gpu.parse_block_overrides("num_warps_bwd=x")
