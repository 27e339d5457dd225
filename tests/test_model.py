"""The Flax MosaicBERT computes what the spec says: sizes, packing, sparse head, dropout, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_cases import group_masked_slots
from mosaicbert_jax import (MosaicBertConfig, MosaicBertForMaskedLM,
                            MosaicBertForSequenceClassification, MosaicBertModel, alibi_slopes,
                            attention, count_params)
from mosaicbert_jax.config import MLM_HEAD_LAYER_NORM_EPS
from mosaicbert_jax.model import gelu

TINY = MosaicBertConfig.tiny(vocab_size=512)


def _init(model, key, seq=16, batch=1):
    ids = jnp.ones((batch, seq), jnp.int32)
    return model.init(key, ids, jnp.ones_like(ids))["params"]


def test_base_mlm_parameter_count_matches_spec():
    model = MosaicBertForMaskedLM(MosaicBertConfig.base())
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids)))
    assert count_params(shapes["params"]) == 137_400_384


def test_large_preset_sizes():
    cfg = MosaicBertConfig.large()
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (1024, 16, 24)
    assert cfg.head_dim == 64 and cfg.vocab_size == 30528 and cfg.layer_norm_eps == 1e-12


def test_alibi_slopes_match_spec_for_12_heads():
    expected = [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    np.testing.assert_allclose(alibi_slopes(12), expected, rtol=1e-6)  # float32: 8 ulps


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_alibi_slopes_power_of_two(n):
    np.testing.assert_allclose(alibi_slopes(n), [2.0 ** (-8 * (k + 1) / n) for k in range(n)],
                               rtol=1e-6)


def test_alibi_slopes_non_power_of_two_interleave():
    s6 = alibi_slopes(6)
    np.testing.assert_allclose(s6[:4], alibi_slopes(4))
    np.testing.assert_allclose(s6[4:], alibi_slopes(8)[[0, 2]])


def _numpy_attention(q, k, v, seg, slopes):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, seq, heads, dim = q.shape
    out = np.zeros_like(q)
    pos = np.arange(seq)
    for b in range(batch):
        for h in range(heads):
            scores = q[b, :, h] @ k[b, :, h].T / np.sqrt(dim)
            scores -= slopes[h] * np.abs(pos[:, None] - pos[None, :])
            allowed = (seg[b][:, None] == seg[b][None, :]) & (seg[b][None, :] != 0)
            for i in range(seq):
                if not allowed[i].any():
                    continue
                s = np.where(allowed[i], scores[i], -np.inf)
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, :, h]
    return out


@pytest.mark.parametrize("heads", [4, 12, 6])
def test_reference_attention_matches_float64_numpy(heads):
    rng = np.random.default_rng(heads)
    batch, seq, dim = 2, 24, 16
    q, k, v = (rng.standard_normal((batch, seq, heads, dim)).astype(np.float32) for _ in range(3))
    seg = np.array([[1] * 10 + [2] * 9 + [0] * 5, [1] * 24], np.int32)
    slopes = alibi_slopes(heads)
    got = attention(q, k, v, seg, slopes, implementation="xla")
    want = _numpy_attention(q, k, v, seg, slopes)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)
    assert np.all(np.asarray(got)[0, 19:] == 0.0)  # padding queries see nothing


def test_packing_matches_each_document_alone():
    model = MosaicBertModel(TINY)
    rng = np.random.default_rng(0)
    lengths, seq = [7, 12, 5], 30
    params = model.init(jax.random.key(1), jnp.ones((1, seq), jnp.int32),
                        jnp.ones((1, seq), jnp.int32))
    docs = [rng.integers(1, TINY.vocab_size, size=n) for n in lengths]
    ids = np.zeros((1, seq), np.int32)
    seg = np.zeros((1, seq), np.int32)
    start = 0
    for s, doc in enumerate(docs, start=1):
        ids[0, start:start + len(doc)] = doc
        seg[0, start:start + len(doc)] = s
        start += len(doc)
    ids[0, start:] = rng.integers(1, TINY.vocab_size, size=seq - start)  # junk under padding
    apply = jax.jit(model.apply)
    packed = np.asarray(apply(params, ids, seg))
    start = 0
    for doc in docs:
        alone = apply(params, jnp.asarray(doc[None], jnp.int32),
                            jnp.ones((1, len(doc)), jnp.int32))
        np.testing.assert_allclose(packed[0, start:start + len(doc)], np.asarray(alone[0]),
                                   atol=1e-5)
        start += len(doc)
    # Changing what sits under padding changes no real token's output.
    ids2 = ids.copy()
    ids2[0, start:] = rng.integers(1, TINY.vocab_size, size=seq - start)
    packed2 = np.asarray(apply(params, ids2, seg))
    np.testing.assert_array_equal(packed2[0, :start], packed[0, :start])


def test_sparse_mlm_head_equals_dense_at_masked_positions():
    model = MosaicBertForMaskedLM(TINY)
    rng = np.random.default_rng(3)
    batch, seq = 2, 20
    ids = rng.integers(1, TINY.vocab_size, size=(batch, seq)).astype(np.int32)
    seg = np.array([[1] * 8 + [2] * 12, [1] * 15 + [0] * 5], np.int32)
    params = _init(model, jax.random.key(2), seq, batch)
    positions = np.array([[0, 3, 9, 19], [1, 2, 14, 0]], np.int32)
    dense = np.asarray(model.apply({"params": params}, ids, seg))
    sparse = np.asarray(model.apply({"params": params}, ids, seg, masked_positions=positions))
    assert dense.shape == (batch, seq, TINY.vocab_size)
    assert sparse.shape == (batch, 4, TINY.vocab_size)
    want = np.take_along_axis(dense, positions[:, :, None], axis=1)
    np.testing.assert_allclose(sparse, want, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_masked_positions_give_the_per_row_logits_loss_and_gradients(groups):
    """Masked slots shared by groups of rows (positions row-in-group * seq + token, empty
    slots at 0 with weight 0) = per-row slots: each slot gets its token's logits, and the
    weighted loss and parameter gradients are the same (the gather's backward adds into
    float32)."""
    from mosaicbert_jax.training.step import masked_lm_sums
    model = MosaicBertForMaskedLM(TINY)
    rng = np.random.default_rng()
    batch, seq = 4, 24
    ids = rng.integers(5, TINY.vocab_size, size=(batch, seq)).astype(np.int32)
    seg = np.ones((batch, seq), np.int32)
    seg[1, 16:], seg[3, 10:] = 2, 0
    counts = np.array([7, 1, 5, 3])  # masked tokens per row vary
    per_row = np.zeros((batch, counts.max()), np.int32)
    weights = np.zeros((batch, counts.max()), np.float32)
    for b in range(batch):
        per_row[b, :counts[b]] = np.sort(rng.choice(np.arange(1, 10), counts[b], replace=False))
        weights[b, :counts[b]] = 1.0
    labels = rng.integers(5, TINY.vocab_size, size=per_row.shape).astype(np.int32)
    slots = counts.sum() // groups + 3  # room to spare: empty slots must not count
    batch_grouped = group_masked_slots(
        {"input_ids": ids, "masked_positions": per_row, "masked_weights": weights,
         "masked_labels": labels}, groups, slots)
    grouped, g_labels, g_weights = (batch_grouped[k] for k in (
        "masked_positions", "masked_labels", "masked_weights"))
    valid = g_weights > 0
    assert valid.sum() == counts.sum()
    params = _init(model, jax.random.key(4), seq, batch)

    def loss(params, positions, labels, weights):
        logits = model.apply({"params": params}, ids, seg, masked_positions=positions)
        return masked_lm_sums(logits, labels, weights)["loss_sum"], logits

    loss_and_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l_row, _), g_row = loss_and_grads(params, per_row, labels, weights)
    (l_grp, logits_grp), g_grp = loss_and_grads(params, grouped, g_labels, g_weights)
    assert logits_grp.shape == (groups, slots, TINY.vocab_size)
    # Each valid grouped slot holds the logits of its (row, token): the dense model's there.
    dense = np.asarray(jax.jit(model.apply)({"params": params}, ids, seg))
    group, slot = np.nonzero(valid)
    row = group * (batch // groups) + grouped[group, slot] // seq
    np.testing.assert_allclose(np.asarray(logits_grp)[group, slot],
                               dense[row, grouped[group, slot] % seq], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l_grp), float(l_row), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_row),
                            jax.tree_util.tree_leaves(g_grp)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="masked_positions has 3 rows, which does not divide"):
        model.apply({"params": params}, ids, seg, masked_positions=grouped[:1].repeat(3, 0))


def _mlm_logits_and_head_input(model, params, ids, seg):
    """MLM logits and the MLM head's LayerNorm output (what the decoder multiplies)."""
    is_head_norm = lambda module, _: module.name == "transform_LayerNorm"
    logits, state = model.apply({"params": params}, ids, seg, capture_intermediates=is_head_norm)
    (normed,) = state["intermediates"]["cls"]["transform_LayerNorm"]["__call__"]
    return np.asarray(logits), np.asarray(normed)


def test_decoder_is_tied_to_word_embeddings():
    model = MosaicBertForMaskedLM(TINY)
    params = _init(model, jax.random.key(0))
    assert "decoder_bias" in params["cls"] and "decoder" not in params["cls"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(np.asarray, params)
    params["cls"]["decoder_bias"] = rng.standard_normal(TINY.vocab_size).astype(np.float32)
    ids = jnp.array([[5, 6, 7]], jnp.int32)
    seg = jnp.ones_like(ids)
    base, normed = _mlm_logits_and_head_input(model, params, ids, seg)
    emb = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    # The logits are exactly the head's output times the word-embedding matrix plus the bias.
    np.testing.assert_allclose(base, normed @ emb.T + params["cls"]["decoder_bias"],
                               atol=1e-5, rtol=1e-5)
    # Move word-embedding row 100 (not an input token, so the encoder is unchanged) by a
    # random non-constant vector: logit column 100 moves by normed @ delta, of order 10,
    # and no other column moves. An untied decoder would leave column 100 where it was.
    delta = rng.standard_normal(TINY.hidden_size).astype(np.float32)
    bumped = jax.tree_util.tree_map(lambda x: x, params)
    bumped["bert"]["embeddings"]["word_embeddings"]["embedding"] = emb.copy()
    bumped["bert"]["embeddings"]["word_embeddings"]["embedding"][100] += delta
    moved, normed_after = _mlm_logits_and_head_input(model, bumped, ids, seg)
    np.testing.assert_array_equal(normed_after, normed)
    expected_change = normed @ delta
    assert np.abs(expected_change).min() > 1.0  # a change no rounding can fake
    np.testing.assert_allclose(moved[..., 100] - base[..., 100], expected_change,
                               atol=1e-4, rtol=1e-4)
    others = np.arange(TINY.vocab_size) != 100
    np.testing.assert_allclose(moved[..., others], base[..., others], atol=1e-5, rtol=0)


def test_dropout_only_when_not_deterministic_and_reproducible():
    model = MosaicBertForMaskedLM(TINY)
    params = _init(model, jax.random.key(0))
    ids = jnp.arange(1, 17, dtype=jnp.int32)[None]
    seg = jnp.ones_like(ids)
    det1 = model.apply({"params": params}, ids, seg, deterministic=True)
    det2 = model.apply({"params": params}, ids, seg, deterministic=True)
    np.testing.assert_array_equal(det1, det2)
    drop = lambda key: model.apply({"params": params}, ids, seg, deterministic=False,
                                   rngs={"dropout": key})
    a, b, c = drop(jax.random.key(7)), drop(jax.random.key(7)), drop(jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, det1)


def test_gelu_is_evaluated_in_float32_for_bf16_inputs():
    x = jnp.linspace(-4, 4, 1001, dtype=jnp.float32).astype(jnp.bfloat16)
    exact = jax.nn.gelu(x.astype(jnp.float32), approximate=False)
    ours = gelu(x)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, exact, rtol=1e-6, atol=1e-7)
    # What bf16 arithmetic throughout would give is visibly worse.
    assert float(jnp.abs(jax.nn.gelu(x, approximate=False).astype(jnp.float32) - exact).max()) \
        > 10 * float(jnp.abs(ours - exact).max())


@pytest.mark.parametrize("dropout_rng", ["hash", "threefry"])
def test_both_dropout_sources_drop_in_the_model(dropout_rng):
    model = MosaicBertForMaskedLM(TINY.replace(dropout_rng=dropout_rng))
    params = _init(model, jax.random.key(0))
    ids = jnp.arange(1, 17, dtype=jnp.int32)[None]
    seg = jnp.ones_like(ids)
    det = model.apply({"params": params}, ids, seg, deterministic=True)
    loss = lambda p, key: model.apply({"params": p}, ids, seg, deterministic=False,
                                      rngs={"dropout": key}).mean()
    grads = jax.jit(jax.grad(loss))(params, jax.random.key(3))
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert not np.allclose(model.apply({"params": params}, ids, seg, deterministic=False,
                                       rngs={"dropout": jax.random.key(3)}), det)


def test_classification_model_shapes_and_param_names():
    cfg = TINY.replace(num_labels=3)
    model = MosaicBertForSequenceClassification(cfg)
    params = _init(model, jax.random.key(0), batch=2)
    assert set(params) == {"bert", "pooler_dense", "classifier"}
    out = model.apply({"params": params}, jnp.ones((2, 16), jnp.int32),
                      jnp.ones((2, 16), jnp.int32))
    assert out.shape == (2, 3) and out.dtype == jnp.float32


def test_bf16_compute_keeps_fp32_params():
    cfg = TINY.replace(dtype="bfloat16")
    model = MosaicBertForMaskedLM(cfg)
    params = _init(model, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    ids = jnp.arange(1, 17, dtype=jnp.int32)[None]
    hidden = MosaicBertModel(cfg).apply({"params": params["bert"]}, ids, jnp.ones_like(ids))
    assert hidden.dtype == jnp.bfloat16
    ref = MosaicBertModel(TINY).apply({"params": params["bert"]}, ids, jnp.ones_like(ids))
    # bf16 rounding (unit roundoff 4e-3) gives a relative error of 5e-3 and at most 0.04 on
    # values up to 4; a real bug gives errors of order 1.
    diff = np.asarray(hidden, np.float32) - np.asarray(ref)
    assert np.linalg.norm(diff) / np.linalg.norm(ref) < 0.02
    assert np.abs(diff).max() < 0.25


def test_remat_gives_same_gradients():
    ids = jnp.arange(1, 17, dtype=jnp.int32)[None]
    seg = jnp.ones_like(ids)
    params = _init(MosaicBertForMaskedLM(TINY), jax.random.key(0))

    def grads(cfg):
        model = MosaicBertForMaskedLM(cfg)
        loss = lambda p: model.apply({"params": p}, ids, seg).mean()
        return jax.jit(jax.grad(loss))(params)

    g1, g2 = grads(TINY), grads(TINY.replace(remat=True))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="hidden_size=100.*num_attention_heads=3"):
        MosaicBertConfig.tiny(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="attention_implementation"):
        MosaicBertConfig.tiny(attention_implementation="magic")
    model = MosaicBertModel(TINY.replace(max_sequence_length=8))
    ids = jnp.ones((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids, ids)
    with pytest.raises(ValueError, match="input id 512 is outside"):
        model.apply(params, jnp.array([[1, 512, 3]], jnp.int32), jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids shape"):
        model.apply(params, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_sequence_length=8"):
        model.apply(params, jnp.ones((1, 9), jnp.int32), jnp.ones((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(*(jnp.ones((1, 4, 2, 8)),) * 3, jnp.ones((1, 4), jnp.int32),
                  alibi_slopes(2), implementation="nope")


def test_mlm_head_layernorm_eps_is_the_originals_whatever_the_config_says():
    """The original hard-codes the MLM head's LayerNorm eps (1e-12): with a large
    layer_norm_eps elsewhere, the head's LayerNorm output still has unit variance per row."""
    cfg = MosaicBertConfig.tiny(vocab_size=64, layer_norm_eps=0.5)
    model = MosaicBertForMaskedLM(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 64, (2, 16)), jnp.int32)
    variables = model.init(jax.random.key(0), ids, jnp.ones_like(ids))
    _, state = model.apply(variables, ids, jnp.ones_like(ids), capture_intermediates=True,
                           mutable=["intermediates"])
    normed = np.asarray(state["intermediates"]["cls"]["transform_LayerNorm"]["__call__"][0])
    # the head's input has a variance of ~1e-3 here: eps 0.5 would shrink it to ~0.002
    np.testing.assert_allclose(normed.var(axis=-1), 1.0, rtol=1e-3)
    assert MLM_HEAD_LAYER_NORM_EPS == 1e-12
