"""The MLM loss's Pallas row kernel (fused/mlm_loss.py, in the Pallas interpreter) against a
float64 numpy log-softmax and against the XLA composition, and its wiring into the model and
the train step, on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM
from mlm_loss_cases import BF16_STEP, bf16_ulps_apart
from mosaicbert_jax.fused import mlm_loss


def _case(rng, rows: int, vocab: int, dtype):
    """Logits offset by 80 (an unshifted logsumexp overflows float32), a bias, labels, 0/1
    weights, a correct prediction and a tie for the row max (the first column is predicted)."""
    logits = rng.standard_normal((rows, vocab)) * 4 + 80
    bias = rng.standard_normal(vocab) * 0.5
    labels = rng.integers(0, vocab, rows)
    weights = (rng.random(rows) > 0.3).astype(np.float32)
    cols = rng.choice(vocab, 2, replace=False)   # two columns of row 1 share the max exactly
    logits[1, cols], bias[cols] = logits[1].max() + 4.0, bias[cols[0]]
    logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32), np.float64)
    bias = np.asarray(jnp.asarray(bias, jnp.float32), np.float64)
    total = logits + bias
    assert total[1, cols[0]] == total[1, cols[1]] == total[1].max()
    labels[0], weights[0] = int(np.argmax(total[0])), 1.0
    labels[1], weights[1] = int(cols.max()), 1.0
    return logits, bias, labels, weights


P_ERROR = 3e-5  # see test_row_kernel_matches_a_float64_log_softmax


def _log_probs(logits, bias):
    shifted = logits + bias - (logits + bias).max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _want(logits, bias, labels, weights):
    total = logits + bias
    log_probs = _log_probs(logits, bias)
    loss = -(np.take_along_axis(log_probs, labels[:, None], -1)[:, 0] * weights).sum()
    correct = ((total.argmax(-1) == labels) * weights).sum()
    grad = (np.exp(log_probs) - np.eye(logits.shape[1])[labels]) * weights[:, None]
    return loss, correct, grad


CHUNKED = mlm_loss.RowBlocks(rows=4, chunk=2048, num_warps=4)
WHOLE_ROW = mlm_loss.RowBlocks(rows=1, chunk=0, num_warps=16)


def _sums_and_grads(impl, logits, bias, labels, weights, dtype,
                    blocks=WHOLE_ROW):
    def loss(l, b):
        sums = mlm_loss.masked_lm_sums(l, jnp.asarray(labels), jnp.asarray(weights), b, impl,
                                       blocks)
        return sums["loss_sum"], sums
    (_, sums), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(logits, dtype), jnp.asarray(bias, jnp.float32))
    return {k: float(v) for k, v in sums.items()}, [np.asarray(g, np.float64) for g in grads]


@pytest.mark.parametrize("vocab,dtype,rows,blocks", [
    (30528, jnp.bfloat16, 7, WHOLE_ROW), (208, jnp.float32, 7, WHOLE_ROW),
    (208, jnp.bfloat16, 7, WHOLE_ROW), (30528, jnp.bfloat16, 8, CHUNKED),
    (208, jnp.bfloat16, 6, mlm_loss.RowBlocks()),
    (208, jnp.float32, 6, mlm_loss.RowBlocks(rows=4, chunk=64)),
    (208, jnp.float32, 7, mlm_loss.RowBlocks(rows=4, chunk=256))])
def test_row_kernel_matches_a_float64_log_softmax(vocab, dtype, rows, blocks):
    """Loss, correct count and both gradients against numpy in float64: in float32 to float32
    rounding; in bf16 the logits' gradient is the float64 one rounded to bf16 (within one bf16
    step of each value) and the bias gradient its column sum (within one step of the sum of
    magnitudes). 30528 covers BERT's vocab (7 power-of-two pieces), 208 = 128 + 64 + 16. The
    chunked variant: 4 rows a program (2 when 6 rows, 1 when 7), a loop of full chunks and
    the pieces of the rest (30528 = 14 x 2048 + 1856; 208 = 3 x 64 + 16; 256 > 208: no loop)."""
    rng = np.random.default_rng()
    logits, bias, labels, weights = _case(rng, rows, vocab, dtype)
    want_loss, want_correct, want_grad = _want(logits, bias, labels, weights)
    sums, (d_logits, d_bias) = _sums_and_grads("pallas_interpret", logits, bias, labels,
                                               weights, dtype, blocks)
    # Error bounds from the float32 arithmetic, not from the data: with |x| < 128 each of
    # the roundings in x - logsumexp moves it by <= 2^-18, so a row's cross-entropy is off
    # by < P_ERROR and each probability by < P_ERROR of itself. The gradient p - one_hot
    # carries that error of p (not of p - 1, which is small where p is near 1).
    probs = np.exp(_log_probs(logits, bias)) * weights[:, None]
    assert abs(sums["loss_sum"] - want_loss) <= P_ERROR * weights.sum() + 1e-6 * want_loss
    assert sums["correct_sum"] == want_correct >= 1
    assert sums["weight_sum"] == weights.sum()
    f32_bound = P_ERROR * probs + 2.0 ** -24 * np.abs(want_grad) + 1e-12
    if dtype == jnp.float32:
        assert np.all(np.abs(d_logits - want_grad) <= f32_bound)
        assert np.all(np.abs(d_bias - want_grad.sum(0))
                      <= f32_bound.sum(0) + 2.0 ** -20 * np.abs(want_grad).sum(0))
    else:
        # Rounding the float32 value to the nearest bf16 moves it by at most half a bf16
        # ulp, <= 2^-9 of it; the bias gradient sums those bf16 values.
        bound = BF16_STEP * (np.abs(want_grad) + f32_bound) + f32_bound
        assert np.all(np.abs(d_logits - want_grad) <= bound)
        assert np.all(np.abs(d_bias - want_grad.sum(0))
                      <= bound.sum(0) + 2.0 ** -20 * np.abs(want_grad).sum(0) + 1e-6)
    assert np.all(d_logits[weights == 0] == 0)


def test_row_kernel_agrees_with_the_xla_composition():
    """The two implementations give the same sums and, to one bf16 value, the same logits
    gradient for the same bf16 inputs (the XLA one sums its bias gradient in float32 before
    the bf16 cast)."""
    rng = np.random.default_rng()
    logits, bias, labels, weights = _case(rng, 5, 30528, jnp.bfloat16)
    got, (g_logits, g_bias) = _sums_and_grads("pallas_interpret", logits, bias, labels,
                                              weights, jnp.bfloat16)
    want, (w_logits, w_bias) = _sums_and_grads("xla", logits, bias, labels, weights,
                                               jnp.bfloat16)
    assert got["correct_sum"] == want["correct_sum"]
    np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=2e-6)
    # Two float32 values a few ulps apart round to bf16 neighbours where they straddle a
    # rounding boundary.
    as_bf16 = lambda x: x.astype(jnp.bfloat16)  # exact: the gradients are bf16
    assert bf16_ulps_apart(as_bf16(g_logits), as_bf16(w_logits)).max() <= 1
    assert np.all(np.abs(g_bias - w_bias) <= BF16_STEP * np.abs(w_logits).sum(0) + 1e-6)


def test_backward_reuses_the_forward_gradient():
    """The kernel runs once per step: the backward scales the gradient the forward wrote
    (one pallas_call in the whole value-and-grad), it does not read the logits again."""
    rng = np.random.default_rng()
    logits, bias, labels, weights = _case(rng, 3, 208, jnp.bfloat16)

    def loss(l, b):
        return mlm_loss.masked_lm_sums(l, jnp.asarray(labels), jnp.asarray(weights), b,
                                       "pallas")["loss_sum"]
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
        jnp.asarray(logits, jnp.bfloat16), jnp.asarray(bias, jnp.float32)))
    assert text.count("pallas_call") == 1


def test_resolve_keeps_xla_by_default_and_refuses_vocabs_the_kernel_cannot_take():
    """'auto' is the measured-faster XLA composition; the kernel runs when asked for."""
    assert mlm_loss.resolve("auto", 30528) == "xla"
    assert mlm_loss.resolve("pallas", 30528) == "pallas"
    assert mlm_loss.resolve("pallas_interpret", 208) == "pallas_interpret"
    with pytest.raises(ValueError, match="30522; use 'xla'"):
        mlm_loss.resolve("pallas", 30522)
    with pytest.raises(ValueError, match="'triton' is not one of"):
        mlm_loss.resolve("triton", 30528)
    with pytest.raises(ValueError, match="RowBlocks.chunk=8 must be 0 or a power of two"):
        mlm_loss.RowBlocks(chunk=8)
    with pytest.raises(ValueError, match="RowBlocks.rows=3 must be a power of two"):
        mlm_loss.RowBlocks(rows=3)
    with pytest.raises(ValueError, match="mlm_loss_implementation='fast'"):
        MosaicBertConfig.tiny(mlm_loss_implementation="fast")


def test_model_loss_and_parameter_gradients_match_across_implementations():
    """A tiny float32 model: the head's logits with the bias apart plus the kernel give the
    loss and parameter gradients of the head's biased logits through the XLA composition."""
    cfg = MosaicBertConfig.tiny(vocab_size=208, dtype=jnp.float32)
    model = MosaicBertForMaskedLM(cfg)
    rng = np.random.default_rng()
    ids = jnp.asarray(rng.integers(5, cfg.vocab_size, (2, 16)), jnp.int32)
    seg = jnp.ones((2, 16), jnp.int32)
    positions = jnp.asarray(np.sort(rng.choice(16, (2, 4)), axis=1), jnp.int32)
    labels = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 4)), jnp.int32)
    weights = jnp.asarray([[1, 1, 1, 0], [1, 0, 1, 1]], jnp.float32)
    params = model.init(jax.random.key(0), ids, seg)["params"]
    params["cls"]["decoder_bias"] = jnp.asarray(rng.standard_normal(cfg.vocab_size) * 0.1,
                                                jnp.float32)

    def fused_loss(params):
        logits, bias = model.apply({"params": params}, ids, seg, masked_positions=positions,
                                   bias_apart=True)
        return mlm_loss.masked_lm_sums(logits, labels, weights, bias,
                                       "pallas_interpret")["loss_sum"]

    def plain_loss(params):
        logits = model.apply({"params": params}, ids, seg, masked_positions=positions)
        return mlm_loss.masked_lm_sums(logits, labels, weights)["loss_sum"]

    got, got_grads = jax.jit(jax.value_and_grad(fused_loss))(params)
    want, want_grads = jax.jit(jax.value_and_grad(plain_loss))(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
        w = want_grads
        for key in path:
            w = w[key.key]
        scale = float(np.abs(np.asarray(w)).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale + 1e-8,
                                   err_msg=jax.tree_util.keystr(path))


def test_default_blocks_are_set_by_parse_blocks_and_used_where_none_are_given():
    """masked_lm_sums without blocks traces the kernel with default_blocks(), which
    set_default_blocks replaces (the benchmarks' --mlm-loss-blocks flag): 6 rows are 3
    programs of 2 rows by default, 6 programs once the default is the whole-row kernel."""
    import re

    def grids() -> list:
        def loss(logits):
            return mlm_loss.masked_lm_sums(logits, jnp.zeros(6, jnp.int32), jnp.ones(6), None,
                                           "pallas_interpret")["loss_sum"]
        text = str(jax.make_jaxpr(loss)(jnp.zeros((6, 208), jnp.bfloat16)))
        return re.findall(r"grid=\(([^)]*)\)", text)

    assert mlm_loss.default_blocks() == mlm_loss.RowBlocks(rows=2, chunk=2048, num_warps=4)
    assert grids() == ["3,"]
    try:
        mlm_loss.set_default_blocks(mlm_loss.parse_blocks("rows=1,chunk=0,num_warps=16"))
        assert grids() == ["6,"]
    finally:
        mlm_loss.set_default_blocks(mlm_loss.RowBlocks())
    with pytest.raises(ValueError, match="RowBlocks override 'row=2' is not field=int"):
        mlm_loss.parse_blocks("row=2")
