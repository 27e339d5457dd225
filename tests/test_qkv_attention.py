"""The fused-QKV entry of the Pallas GPU kernel (interpreter on CPU): it reads q, k, v in place
from the projection's [batch, seq, 3, heads, head_dim] output and returns d(qkv) as one array.
Checked against the float64 reference and against the sliced kernel, forward and gradients,
fp32 and bf16, with and without a window, on fresh random packed layouts whose length is
not a multiple of the block; the model takes this path and matches the XLA model; the
kernels pass the Triton lowering for CUDA.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import (check_random_packed_layouts, fresh_rng, random_packed_layouts,
                             relative_error)
from model_cases import assert_same_loss_and_grads, mlm_loss_fn, random_mlm_batch
from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_jax.attention import (alibi_slopes, attention_qkv, qkv_implementations,
                                      register_implementation)
from mosaicbert_jax.attention.pallas_gpu import (BlockSizes, flash_attention,
                                                 flash_attention_qkv)
from mosaicbert_jax.attention.reference import xla_attention

SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32,
                          block_q_dq=32, block_k_dq=16)
# bf16 against float64: the tolerances the GPU check uses (benchmarks/check_attention.py).
BF16_TOLERANCES = dict(forward_tolerance=2e-2, gradient_tolerance=3e-2)


def _fused_from_slices(block_sizes, window):
    """fn(q, k, v, segment_ids, slopes, scale) through the fused entry: q, k, v stacked into
    one qkv, so the reference checks read d(qkv) back slot by slot."""
    def run(q, k, v, segment_ids, slopes, scale):
        return flash_attention_qkv(jnp.stack([q, k, v], axis=2), segment_ids, slopes, scale,
                                   block_sizes=block_sizes, interpret=True, window=window)
    return run


# 100 and 77 are multiples of no block (padded to 128 or 112); 16-blocks with a window cut
# through the band; the default 64-blocks at 77 pad by 51 tokens.
@pytest.mark.parametrize("dtype,seq,window,block_sizes", [
    (jnp.float32, 100, 0, SMALL_BLOCKS),
    (jnp.float32, 77, 7, dataclasses.replace(SMALL_BLOCKS, unmasked_interior=False)),
    (jnp.bfloat16, 77, 0, None),
    (jnp.bfloat16, 100, 33, SMALL_BLOCKS),
    (jnp.float32, 100, 0, dataclasses.replace(SMALL_BLOCKS, delta_in_dq_kernel=True)),
])
def test_fused_entry_matches_float64_reference(dtype, seq, window, block_sizes):
    tolerances = BF16_TOLERANCES if dtype == jnp.bfloat16 else {}
    check_random_packed_layouts(_fused_from_slices(block_sizes, window), seq, draws=2,
                                batch=3, heads=2, head_dim=16, dtype=dtype, window=window,
                                name=f"fused qkv {block_sizes}", **tolerances)


def _output_and_qkv_grad(fn, qkv, d_out):
    out, vjp = jax.vjp(fn, qkv)
    return out, vjp(d_out)[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_entry_equals_sliced_kernel_and_xla_on_the_same_qkv(dtype):
    """Same kernels, so the fused entry and the sliced kernel agree to rounding on one qkv
    (a wrong slot would be O(1) off); the dispatcher's xla path (slices) agrees too. (The
    dispatcher's fused path is the model test's.)"""
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 3, 72, 2, 32
    window = int(rng.choice([0, 9]))
    segment_ids = jnp.asarray(random_packed_layouts(rng, batch, seq))
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    qkv = jnp.asarray(rng.standard_normal((batch, seq, 3, heads, head_dim)), dtype)
    d_out = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), dtype)

    def sliced(qkv):
        return flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], segment_ids, slopes,
                               scale, block_sizes=SMALL_BLOCKS, interpret=True, window=window)

    def fused(qkv):
        return flash_attention_qkv(qkv, segment_ids, slopes, scale, block_sizes=SMALL_BLOCKS,
                                   interpret=True, window=window)

    run = jax.jit(_output_and_qkv_grad, static_argnums=0)
    got = run(fused, qkv, d_out)
    want = run(sliced, qkv, d_out)
    context = f"seed {seed}, window {window}"
    for name, g, w in zip(("out", "d_qkv"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, f"{name}: {g.shape} {g.dtype}"
        assert relative_error(g, w) < 1e-5, f"{name}: {relative_error(g, w):.1e} ({context})"
    # The dispatcher's xla path (slices) on fp32 copies agrees within the dtype's rounding.
    upcast = [x.astype(jnp.float32) for x in (qkv, d_out)]
    xla = run(lambda x: attention_qkv(x, segment_ids, slopes, "xla", window=window), *upcast)
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    for name, g, w in zip(("out", "d_qkv"), got, xla):
        assert relative_error(g, w) < tolerance, f"{name} vs xla ({context})"


@pytest.mark.parametrize("dtype,window,block_sizes", [
    (jnp.float32, 0, SMALL_BLOCKS),
    (jnp.float32, 9, dataclasses.replace(SMALL_BLOCKS, unmasked_interior=False)),
    (jnp.float32, 0, BlockSizes(one_pass_backward_max_seq=128)),
    (jnp.float32, 0, dataclasses.replace(SMALL_BLOCKS, delta_in_dq_kernel=True)),
    # dQ and dK/dV blocks of different sizes: their bias partial sums are reduced apart.
    (jnp.float32, 0, dataclasses.replace(SMALL_BLOCKS, block_k_dkv=16)),
    (jnp.bfloat16, 0, None),
])
def test_fused_entry_adds_the_projection_bias_as_it_reads_qkv(dtype, window, block_sizes):
    """bias given to the kernels = bias added to qkv first (the Dense layer's add; for bf16,
    in float32), forward and the gradients of qkv and of the bias (the sum of d(qkv) over
    tokens, 0 for b_k); a bias of the wrong size is refused."""
    rng, seed = fresh_rng()
    batch, seq, heads, head_dim = 3, 72, 2, 32
    segment_ids = jnp.asarray(random_packed_layouts(rng, batch, seq))
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    qkv = jnp.asarray(rng.standard_normal((batch, seq, 3, heads, head_dim)), dtype)
    bias = jnp.asarray(rng.standard_normal(3 * heads * head_dim), dtype)
    d_out = jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), dtype)

    def in_kernel(qkv, bias):
        return flash_attention_qkv(qkv, segment_ids, slopes, scale, block_sizes=block_sizes,
                                   interpret=True, window=window, bias=bias)

    def added_first(qkv, bias):
        qkv = qkv + bias.reshape(3, heads, head_dim)
        return flash_attention_qkv(qkv, segment_ids, slopes, scale, block_sizes=block_sizes,
                                   interpret=True, window=window)

    def run(fn, dtype=dtype):
        out, vjp = jax.vjp(fn, qkv.astype(dtype), bias.astype(dtype))
        return (out, *vjp(d_out.astype(dtype)))

    got = jax.jit(lambda: run(in_kernel))()
    unbiased = jax.jit(lambda: run(lambda q, b: in_kernel(q, jnp.zeros_like(b))))()
    # bf16 is checked against the float32 reference: the bf16 one rounds qkv + bias and its
    # d(bias) sums 216 rounded d(qkv) tiles, each about 1% off the exact value, where the
    # kernels sum unrounded tiles (0.2-0.7% off float32 over 14 seeds).
    want = jax.jit(lambda: run(added_first, jnp.float32))()
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for name, g, w in zip(("out", "d_qkv", "d_bias"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, f"{name}: {g.shape} {g.dtype}"
        assert relative_error(g, w) < tolerance, f"{name}: {relative_error(g, w):.1e} (seed {seed})"
    assert relative_error(got[0], unbiased[0]) > 0.05  # the bias did change the output
    # d(b_q), d(b_v): the sums of their d(qkv) slots over tokens (the kernels sum the
    # unrounded tiles; in bf16, slot by slot against the float32 reference's); d(b_k) is
    # exactly 0, as each query's dS row sums to 0.
    d_bias = np.asarray(got[2], np.float32).reshape(3, heads, head_dim)
    for slot in (0, 2):
        if dtype == jnp.bfloat16:
            error = relative_error(d_bias[slot].ravel(), np.asarray(want[2]).reshape(3, -1)[slot])
            assert error < tolerance, f"d_bias slot {slot}: {error:.1e} (seed {seed})"
        else:
            slot_sum = np.asarray(jnp.sum(got[1], axis=(0, 1)))[slot]
            np.testing.assert_allclose(d_bias[slot], slot_sum, rtol=1e-5, atol=1e-5)
    assert np.all(d_bias[1] == 0.0)
    assert np.abs(d_bias[0]).max() > 0.1 and np.abs(d_bias[2]).max() > 0.1
    with pytest.raises(ValueError, match=r"qkv bias of shape \(5,\) does not match"):
        attention_qkv(qkv, segment_ids, slopes, "pallas_interpret", bias=jnp.ones(5))


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' params."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    yield from _eqns(sub)


def test_model_takes_the_fused_path_and_matches_the_xla_model():
    """Same parameters: loss and every gradient agree with the xla model; the traced step
    feeds the kernels the 5-D qkv and fills d(qkv) by aliasing, with no slices around."""
    rng, seed = fresh_rng()
    # 40 tokens: not a multiple of the 64-blocks, so padding runs too
    data = random_mlm_batch(rng, np.stack([[1] * 22 + [2] * 13 + [0] * 5, [3] * 40]), masked=6)
    batch = data[0].shape[0]
    results = {}
    for impl in ("xla", "pallas_interpret"):
        cfg = MosaicBertConfig.tiny(vocab_size=128, attention_implementation=impl,
                                    hidden_dropout_prob=0.0)
        model = MosaicBertForMaskedLM(cfg)
        params = model.init(jax.random.key(0), data[0], data[1])["params"]
        grad_fn = jax.value_and_grad(mlm_loss_fn(model, data))
        results[impl] = jax.jit(grad_fn)(params)
        if impl == "pallas_interpret":
            calls = [e for e in _eqns(jax.make_jaxpr(grad_fn)(params))
                     if e.primitive.name == "pallas_call"]
            fused_inputs = [e for e in calls
                            if any(v.aval.shape == (batch, 64, 3, 4, 32) for v in e.invars)]
            aliased = [e for e in calls if e.params["input_output_aliases"]]
            # Per layer: forward, dK/dV and dQ read the padded qkv; dQ aliases d(qkv).
            assert len(calls) == 3 * cfg.num_hidden_layers, len(calls)
            assert len(fused_inputs) == len(calls) and len(aliased) == cfg.num_hidden_layers
    assert_same_loss_and_grads(results["xla"], results["pallas_interpret"], seed)


@pytest.mark.parametrize("head_dim,window", [(64, 0), (128, 16)])
def test_fused_and_sliced_kernels_lower_for_cuda(head_dim, window):
    """Forward and backward of both entries pass the Triton lowering (the step a GPU compile
    starts with), so unsupported Triton constructs fail here; the fused backward is three
    kernels, its d(qkv) aliased into dQ, and nothing concatenates a 5-D array."""
    batch, seq, heads = 2, 256, 2
    qkv = jnp.zeros((batch, seq, 3, heads, head_dim), jnp.bfloat16)
    segment_ids = jnp.ones((batch, seq), jnp.int32)
    slopes = jnp.asarray(alibi_slopes(heads))

    def fused(qkv):  # with the projection bias, as the model calls it
        return flash_attention_qkv(qkv, segment_ids, slopes, 0.125, window=window,
                                   bias=jnp.ones(3 * heads * head_dim, qkv.dtype))

    def sliced(qkv):
        return flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], segment_ids, slopes,
                               0.125, window=window)

    for fn in (fused, sliced):
        step = lambda qkv: _output_and_qkv_grad(fn, qkv, qkv[:, :, 0])
        text = jax.jit(step).trace(qkv).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3, fn.__name__
        concatenated = re.findall(r"stablehlo\.concatenate.*?-> tensor<([0-9x]+)x[a-z]", text)
        if fn is fused:
            assert "output_operand_aliases" in text
            assert not [s for s in concatenated if s.count("x") == 4], concatenated


def test_dispatcher_gives_plain_implementations_the_slices():
    rng, _ = fresh_rng()
    qkv = jnp.asarray(rng.standard_normal((1, 8, 3, 2, 16)), jnp.float32)
    segment_ids, slopes = jnp.ones((1, 8), jnp.int32), jnp.ones((2,), jnp.float32)
    seen = []

    def plain(q, k, v, segment_ids, slopes, scale):
        seen.append((q, k, v))
        return xla_attention(q, k, v, segment_ids, slopes, scale)

    register_implementation("test_plain_qkv", plain)
    out = attention_qkv(qkv, segment_ids, slopes, "test_plain_qkv")
    assert [x.shape for x in seen[0]] == [(1, 8, 2, 16)] * 3
    for slot, x in enumerate(seen[0]):
        np.testing.assert_array_equal(x, qkv[:, :, slot])
    np.testing.assert_array_equal(out, xla_attention(*seen[0], segment_ids, slopes, 0.25))
    assert {"pallas", "pallas_interpret"} <= set(qkv_implementations())
    assert "test_plain_qkv" not in qkv_implementations()
    with pytest.raises(ValueError, match=r"qkv shape \(1, 8, 2, 16\) must be"):
        attention_qkv(qkv[:, :, 0], segment_ids, slopes, "pallas_interpret")
    with pytest.raises(ValueError, match="alibi_slopes shape"):
        attention_qkv(qkv, segment_ids, jnp.ones(3), "pallas_interpret")
    with pytest.raises(ValueError, match="'test_plain_qkv' has no sliding window"):
        attention_qkv(qkv, segment_ids, slopes, "test_plain_qkv", window=2)
