"""The training job: sharded step equivalence, exact resume, the spec's weight decay, errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mosaicbert_jax.optim import decoupled_adamw, warmup_linear_decay
from mosaicbert_jax.sharding import resolve_mesh_shape
from mosaicbert_jax.train import check_batch_layout, train_and_evaluate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**train):
    config = tiny.get_config()
    config.data.source = "synthetic"
    config.data.seq_len = 32
    config.data.synthetic_mean_doc_len = 12
    config.model.vocab_size = 256
    config.train.global_batch_size = 8
    config.train.steps = 6
    config.train.log_every = 2
    config.train.eval_every = 3
    config.train.eval_batches = 1
    config.train.checkpoint_every = 3
    config.train.async_checkpointing = False
    for key, value in train.items():
        config.train[key] = value
    return config


def test_sharded_step_matches_one_device_and_accumulation():
    script = os.path.join(os.path.dirname(__file__), "_mesh_equivalence.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def _params(result):
    return jax.device_get(result["state"]["params"])


def test_resume_is_exact(tmp_path):
    uninterrupted = train_and_evaluate(small_config(steps=6), str(tmp_path / "full"))
    first = train_and_evaluate(small_config(steps=6), str(tmp_path / "split"), stop_after=3)
    assert first["steps"] == 3
    resumed = train_and_evaluate(small_config(steps=6), str(tmp_path / "split"))
    assert resumed["resumed_from"] == 3
    for a, b in zip(jax.tree_util.tree_leaves(_params(uninterrupted)),
                    jax.tree_util.tree_leaves(_params(resumed))):
        np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert os.path.isdir(tmp_path / "split" / "tensorboard")


def test_weight_decay_is_decoupled_as_the_spec_says():
    # A large decay, so each step's decrement (up to 10% of p) is far above float32 rounding
    # of p (1e-7 relative); the spec's formula does not depend on the decay's size.
    peak, wd = 5e-4, 0.1
    schedule = warmup_linear_decay(peak, 100, warmup_fraction=0.06, final_lr_fraction=0.02)
    tx = decoupled_adamw(schedule, peak, weight_decay=wd)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(params)
    for step in range(10):  # zero gradients: Adam's update is 0, only the decay moves p
        lr_t = float(schedule(step))
        before = np.asarray(params["w"], np.float64)
        updates, state = tx.update({"w": jnp.zeros(3)}, state, params)
        params = optax.apply_updates(params, updates)
        decrement = before - np.asarray(params["w"], np.float64)
        np.testing.assert_allclose(decrement, wd * (lr_t / peak) * before, rtol=1e-4, atol=0)


def test_schedule_warmup_then_linear_decay_to_two_percent():
    schedule = warmup_linear_decay(5e-4, 1000)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(60)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(1000)), 0.02 * 5e-4, rtol=1e-5)
    assert float(schedule(30)) == pytest.approx(2.5e-4, rel=1e-5)


def test_clear_errors_before_compiling(tmp_path):
    with pytest.raises(ValueError, match="not divisible by data-parallel size 8"):
        check_batch_layout(12, 1, 8, 1)
    with pytest.raises(ValueError, match="needs 6 devices but 8 are present"):
        resolve_mesh_shape({"data": 2, "fsdp": 3, "tensor": 1}, 8)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    config = small_config()
    config.data.source = "shards"
    config.data.shards_dir = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        train_and_evaluate(config, str(tmp_path / "wd"))
    config = small_config()
    config.train.unlock()
    config.train.stepz = 3
    with pytest.raises(ValueError, match="did you mean 'train.steps'"):
        train_and_evaluate(config, str(tmp_path / "wd"))


def test_tiny_config_learns_on_the_embedded_corpus(tmp_path):
    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.seq_len = 64
    config.train.global_batch_size = 16
    config.train.steps = 40
    config.train.log_every = 20
    config.train.eval_every = 40
    config.train.eval_batches = 2
    config.train.checkpoint_every = 40
    result = train_and_evaluate(config, str(tmp_path / "wd"))
    assert result["params"] > 1_000_000
    assert result["final_eval_loss"] < result["first_eval_loss"] - 1.5, result
    assert os.listdir(tmp_path / "wd" / "checkpoints") == ["40"]


def test_model_vocab_follows_the_data_or_must_hold_it(tmp_path):
    from mosaicbert_jax.data.training_data import make_training_data

    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.embedded_vocab_size = 1000
    data = make_training_data(config.data, 2, 0, 0, 1)
    assert data.vocab_size == data.train.vocab_size and data.vocab_size % 64 == 0
    assert data.vocab_size >= 1000 and os.path.basename(data.tokenizer_file) == "tokenizer.json"
    assert make_training_data(config.data, 2, 0, 0, 1, model_vocab_size=2048).vocab_size == 2048
    with pytest.raises(ValueError, match="too large for the model's vocab_size=512"):
        make_training_data(config.data, 2, 0, 0, 1, model_vocab_size=512)
    config.data.source = "synthetic"
    assert make_training_data(config.data, 2, 0, 0, 1).vocab_size == 30528
    synthetic = make_training_data(config.data, 2, 0, 0, 1, model_vocab_size=256)
    assert synthetic.vocab_size == 256 and synthetic.tokenizer_file is None
    assert next(synthetic.train)["input_ids"].max() < 256


def cli_env() -> dict:
    """The environment for running our commands in a subprocess: this checkout, CPU, no
    inherited JAX_* settings and no MOSAICBERT_TRACEBACK (user errors stay one line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_COMPILATION_CACHE_DIR"}
    env.pop("MOSAICBERT_TRACEBACK", None)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return env


def test_the_command_line_reports_a_user_error_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mosaicbert_jax.train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", "--config.data.source=nope"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2  # cli_errors' status for a user error
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.data.source='nope'; use one of ('shards', 'embedded', 'synthetic')")


def test_masked_lm_sums_are_cross_entropy_and_accuracy_computed_plainly():
    """Loss, gradient and accuracy of the shifted formulation against a direct numpy
    log-softmax, on logits large enough that an unshifted logsumexp would overflow, with a
    tied row max (numpy's argmax takes the first)."""
    from mosaicbert_jax.training.step import masked_lm_sums
    rng = np.random.default_rng()
    logits = rng.standard_normal((3, 5, 40)) * 30 + 80
    labels = rng.integers(0, 40, (3, 5))
    labels[0, 0] = int(np.argmax(logits[0, 0]))  # at least one correct prediction
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    weights[0, 0] = 1.0
    logits[1, 2, [3, 17]] = logits[1, 2].max() + 1.0  # a tie: the first index is predicted
    labels[1, 2], weights[1, 2] = 17, 1.0
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want_loss = -(np.take_along_axis(log_probs, labels[..., None], -1)[..., 0] * weights).sum()
    want_correct = ((logits.argmax(-1) == labels) * weights).sum()
    one_hot = np.eye(40)[labels]
    want_grad = (np.exp(log_probs) - one_hot) * weights[..., None]
    sums = masked_lm_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                          jnp.asarray(weights))
    np.testing.assert_allclose(float(sums["loss_sum"]), want_loss, rtol=1e-5)
    assert float(sums["correct_sum"]) == want_correct >= 1
    assert float(sums["weight_sum"]) == weights.sum()
    grad = jax.grad(lambda l: masked_lm_sums(l, jnp.asarray(labels),
                                             jnp.asarray(weights))["loss_sum"])(
        jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-5)


def test_masked_lm_gradient_is_elementwise_not_a_scatter():
    """The loss gradient is softmax - one_hot as one expression of the logits (no scatter of
    the label picks into a materialised [tokens, vocab] buffer), so XLA can fuse it with
    the bf16 cast and the decoder-bias reduction."""
    from mosaicbert_jax.training.step import masked_lm_sums
    logits = jnp.zeros((2, 3, 50), jnp.float32)
    labels, weights = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), jnp.float32)
    grad_fn = jax.jit(jax.grad(lambda l: masked_lm_sums(l, labels, weights)["loss_sum"]))
    hlo = grad_fn.lower(logits).as_text()
    assert "scatter" not in hlo
    np.testing.assert_allclose(np.asarray(grad_fn(logits))[0, 0],
                               np.full(50, 1 / 50) - np.eye(50)[0], atol=1e-7)


def test_the_step_trains_the_same_on_slots_grouped_across_the_batch():
    """masked_positions [1, slots] holding every row's masked tokens (row * seq + position)
    give the per-row step's loss and updated parameters; microbatches, which split rows,
    refuse them in one line."""
    from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM
    from mosaicbert_jax.data.synthetic import SyntheticMLMBatches
    from mosaicbert_jax.sharding import batch_sharding, make_mesh
    from mosaicbert_jax.training.step import init_state, make_train_step
    from model_cases import group_masked_slots
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model = MosaicBertForMaskedLM(MosaicBertConfig.tiny(vocab_size=256, hidden_dropout_prob=0.0,
                                                        attention_probs_dropout_prob=0.0))
    schedule = optax.constant_schedule(1e-3)  # no warmup: the first step moves the params
    tx = decoupled_adamw(schedule, 1e-3)
    state, shardings = init_state(model, tx, 0, mesh)
    per_row = next(SyntheticMLMBatches(8, 32, 256, seed=5, mean_doc_len=12))
    valid = per_row["masked_weights"] > 0
    grouped = group_masked_slots(per_row, 1, int(valid.sum()) + 5)  # empty slots too
    step = make_train_step(model, tx, schedule, mesh, shardings)
    results = [step(jax.tree_util.tree_map(jnp.copy, state),
                    jax.device_put(batch, batch_sharding(mesh))) for batch in (per_row, grouped)]
    (want_state, want), (got_state, got) = results
    assert float(got["masked_tokens"]) == float(want["masked_tokens"]) == valid.sum()
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree_util.tree_leaves(want_state["params"]),
                    jax.tree_util.tree_leaves(got_state["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    moved = [not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(got_state["params"]), jax.tree_util.tree_leaves(state["params"]))]
    assert all(moved)
    two = make_train_step(model, tx, schedule, mesh, shardings, microbatches=2)
    with pytest.raises(ValueError, match="microbatches > 1 need masked_positions per row"):
        two(jax.tree_util.tree_map(jnp.copy, state), jax.device_put(grouped, batch_sharding(mesh)))


def test_global_norm_counts_every_leaf_once():
    """global_norm stacks small same-shape leaves and reduces them together: on a tree of
    small vectors of two shapes, a matrix above the threshold, a scalar and a bf16 leaf it
    equals the float64 norm of all of them, and each leaf carries at least 1% of the total, so
    a leaf dropped or counted twice would show."""
    from mosaicbert_jax.training.step import global_norm

    keys = iter(jax.random.split(jax.random.key(int.from_bytes(os.urandom(4), "little")), 9))
    normal = lambda shape, dtype=jnp.float32: jax.random.normal(next(keys), shape, dtype)
    tree = {"a": normal((768,)), "b": [normal((768,)), normal((2304,))],
            "c": normal((2304,)) * 2, "scalar": normal(()) + 30.0,
            "big": normal((300, 300)) * 0.1, "half": normal((768,), jnp.bfloat16)}
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]
    squares = [float(np.sum(x * x)) for x in leaves]
    assert min(squares) > 0.01 * sum(squares)
    want = np.sqrt(sum(squares))
    got = float(jax.jit(lambda t: global_norm(t, small=1 << 16))(tree))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The same with every leaf reduced on its own (threshold 0).
    np.testing.assert_allclose(float(global_norm(tree, small=0)), want, rtol=1e-5)
