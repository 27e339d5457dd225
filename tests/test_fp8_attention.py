"""The FP8 QKV projection + attention op (fused/fp8_attention.py), whose attention backward
writes d(qkv) as float8: its kernels against the plain backward followed by the quantize
pass, byte for byte; the op against fused/fp8_dense.py's op followed by the attention, every
output, gradient and amax bit for bit; and the model with the switch on and off. All in the
Pallas interpreter, on fresh random packed layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM, fp8
from mosaicbert_jax.fused import fp8_attention
from mosaicbert_jax.training.step import masked_lm_sums
from attention_cases import fresh_rng, random_packed_layouts
from fp8_attention_cases import assert_same_bits, kernel_grads, op_outputs_and_grads

BF16 = jnp.bfloat16


def _window(rng) -> int:
    return int(rng.choice([0, 0, 17]))


def test_kernels_write_the_quantize_pass_bytes_of_the_bf16_grad():
    rng, seed = fresh_rng()
    window = _window(rng)
    got, want, clipped = kernel_grads(rng, True, batch=3, seq=128, heads=2, head_dim=16,
                                      window=window)
    what = f"seed {seed}, window {window}"
    assert got[0][0].dtype == fp8.BACKWARD_DTYPE, what
    assert_same_bits(got, want, what)
    assert float(got[0][2]) > 0, what
    assert 0 < clipped < 0.5, (clipped, what)  # the clip is part of what must agree


def test_op_equals_the_dense_op_then_attention_bit_for_bit():
    rng, seed = fresh_rng()
    window = _window(rng)
    got, want = op_outputs_and_grads(rng, "pallas_interpret", batch=3, seq=128, heads=2,
                                     head_dim=16, window=window)
    assert_same_bits(got, want, f"seed {seed}, window {window}")
    out, (dx, dw, d_bias, seen) = got
    assert float(jnp.max(jnp.abs(dx.astype(jnp.float32)))) > 0, seed
    # The output gradient's amax is d(qkv)'s, which the kernels measured.
    assert float(seen["output_grad"][0]) > 0 and np.all(np.asarray(seen["output_grad"][1]) == 0)


def test_model_with_the_switch_on_and_off_trains_alike_and_quantizes_once_less():
    """The tiny FP8 model with Pallas (interpreted) attention: the same loss, gradients and
    stats either way, and the fused path runs one quantize pass fewer per layer."""
    rng, seed = fresh_rng()
    batch, seq, vocab = 2, 64, 128
    segments = jnp.asarray(random_packed_layouts(rng, batch, seq))
    ids = jnp.asarray(rng.integers(5, vocab, (batch, seq)), jnp.int32)
    positions = jnp.asarray(np.sort(rng.choice(seq, (batch, 6), replace=False), 1), jnp.int32)
    labels = jnp.asarray(rng.integers(5, vocab, (batch, 6)), jnp.int32)
    weights = (jnp.take_along_axis(segments, positions, 1) > 0).astype(jnp.float32)

    def config(on: bool) -> MosaicBertConfig:
        return MosaicBertConfig.tiny(vocab_size=vocab, hidden_dropout_prob=0.0, fp8=True,
                                     fp8_gemm="encoder", attention_implementation="pallas_interpret",
                                     glu_implementation="pallas_interpret",
                                     layernorm_implementation="xla",
                                     fp8_qkv_grad_in_attention=on)
    model_on, model_off = MosaicBertForMaskedLM(config(True)), MosaicBertForMaskedLM(config(False))
    variables = model_off.init(jax.random.key(seed % 1000), ids, segments,
                               masked_positions=positions)

    def loss_and_grads(model):
        def loss(params, stats):
            logits = model.apply({"params": params, fp8.STATS: stats}, ids, segments,
                                 masked_positions=positions)
            return masked_lm_sums(logits, labels, weights)["loss_sum"]
        fn = jax.value_and_grad(loss, argnums=(0, 1))
        jaxpr = str(jax.make_jaxpr(fn)(variables["params"], variables[fp8.STATS]))
        return jax.jit(fn)(variables["params"], variables[fp8.STATS]), jaxpr
    (on, jaxpr_on), (off, jaxpr_off) = loss_and_grads(model_on), loss_and_grads(model_off)
    layers = model_on.config.num_hidden_layers
    count = lambda jaxpr: jaxpr.count("name=quantize_fp8")
    assert count(jaxpr_off) - count(jaxpr_on) == layers, (count(jaxpr_off), count(jaxpr_on))
    assert jax.tree_util.tree_structure(on) == jax.tree_util.tree_structure(off)
    assert_same_bits(on, off, f"seed {seed}")
    assert np.isfinite(float(on[0])) and float(on[0]) > 0


def test_unsupported_shapes_keep_the_two_op_path():
    assert fp8_attention.supported("pallas", 128, 64)
    assert not fp8_attention.supported("xla", 128, 64)
    assert not fp8_attention.supported("pallas", 100, 64)  # would need sequence padding
    assert not fp8_attention.supported("pallas", 128, 48)
    assert not fp8_attention.resolve_use(True, fp8.dense_op_roles("mlp"), "pallas", 128, 64)
    assert not fp8_attention.resolve_use(False, fp8.dense_op_roles("encoder"), "pallas", 128, 64)
    with pytest.raises(ValueError, match="qkv_attention needs a Pallas GPU attention"):
        fp8_attention.qkv_attention(
            jnp.zeros((1, 100, 32), BF16), jnp.zeros((32, 96), BF16), jnp.zeros(96, BF16), {},
            jnp.ones((1, 100), jnp.int32), jnp.ones(2), heads=2,
            attention_implementation="pallas_interpret", quantize_implementation="xla")
