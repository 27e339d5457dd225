"""Shared pieces of the tests that run the tiny MLM model two ways (a kernel path and the
plain XLA path) and require the same loss and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from attention_cases import relative_error


def random_mlm_batch(rng, segments: np.ndarray, masked: int, vocab: int = 100):
    """(ids, segments, positions, labels): random ids for `segments` [batch, seq], `masked`
    sorted positions per row among the first tokens that no row pads."""
    batch, seq = segments.shape
    content = int(min(np.count_nonzero(row) for row in segments))
    ids = jnp.asarray(rng.integers(5, vocab, (batch, seq)), jnp.int32)
    positions = jnp.asarray(np.sort(rng.choice(content, (batch, masked), replace=False), axis=1),
                            jnp.int32)
    labels = jnp.asarray(rng.integers(5, vocab, (batch, masked)), jnp.int32)
    return ids, jnp.asarray(segments, jnp.int32), positions, labels


def mlm_loss_fn(model, batch, dropout_seed=None):
    """params -> mean negative log-likelihood of the labels at the masked positions; with a
    dropout_seed, dropout on (the same masks for every implementation)."""
    ids, segments, positions, labels = batch

    def loss(params):
        kwargs = ({} if dropout_seed is None else
                  dict(deterministic=False, rngs={"dropout": jax.random.key(dropout_seed)}))
        logits = model.apply({"params": params}, ids, segments, masked_positions=positions,
                             **kwargs)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)
        return -jnp.mean(picked)
    return loss


def assert_same_loss_and_grads(want, got, seed) -> None:
    """(loss, grads) pairs: losses within 1e-5 relative, every gradient within 1e-4."""
    (l_ref, g_ref), (l_got, g_got) = want, got
    assert abs(float(l_ref) - float(l_got)) < 1e-5 * abs(float(l_ref)), f"seed {seed}"
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(g_ref))
    flat_got = dict(jax.tree_util.tree_leaves_with_path(g_got))
    assert flat_ref.keys() == flat_got.keys()
    for path, a in flat_ref.items():
        err = relative_error(flat_got[path], a)
        assert err < 1e-4, f"{jax.tree_util.keystr(path)}: {err:.2e} (seed {seed})"


def group_masked_slots(batch: dict, groups: int, slots: int) -> dict:
    """A per-row MLM batch ([B, K] masked_*) with its masked slots shared by `groups` groups
    of rows instead: [groups, slots] arrays, position = row-in-group * seq + token, valid
    slots first (the model's grouped masked_positions)."""
    batch = dict(batch)
    rows, seq = batch["input_ids"].shape
    per_group = rows // groups
    valid = batch["masked_weights"] > 0
    out = {k: np.zeros((groups, slots), batch[k].dtype)
           for k in ("masked_positions", "masked_weights", "masked_labels")}
    for g in range(groups):
        r, j = np.nonzero(valid[g * per_group:(g + 1) * per_group])
        n = len(r)
        out["masked_positions"][g, :n] = r * seq + batch["masked_positions"][g * per_group + r, j]
        out["masked_weights"][g, :n] = 1.0
        out["masked_labels"][g, :n] = batch["masked_labels"][g * per_group + r, j]
    batch.update(out)
    return batch
