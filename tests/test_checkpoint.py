"""save_pretrained / load_pretrained and training-checkpoint loading on real Orbax folders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mosaicbert_jax import (MosaicBertConfig, MosaicBertForMaskedLM,
                            MosaicBertForSequenceClassification)
from mosaicbert_jax.checkpoint import (config_from_dict, config_to_dict, load_pretrained,
                                       save_pretrained)
from mosaicbert_jax.param_layout import infer_model_kind

TINY = MosaicBertConfig.tiny(vocab_size=256, num_labels=3)


def random_params(model, seed: int):
    """Random numpy params with the model's tree (no init compile: fast, biases non-zero)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert isinstance(y, np.ndarray)
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_config_dict_round_trip_through_json():
    config = MosaicBertConfig.large(dtype="bfloat16", max_sequence_length=1024, remat=True,
                                    classifier_dropout_prob=0.2)
    values = json.loads(json.dumps(config_to_dict(config)))
    assert values["dtype"] == "bfloat16" and values["param_dtype"] == "float32"
    assert config_from_dict(values) == config


def test_config_from_dict_lists_unknown_keys():
    values = {**config_to_dict(TINY), "hiden_size": 3, "rotary": True}
    with pytest.raises(ValueError, match=r"\['hiden_size', 'rotary'\]"):
        config_from_dict(values)


@pytest.mark.parametrize("model_cls, kind", [(MosaicBertForMaskedLM, "mlm"),
                                             (MosaicBertForSequenceClassification,
                                              "classification")])
def test_save_and_load_pretrained(tmp_path, model_cls, kind):
    params = random_params(model_cls(TINY), seed=1)
    tokenizer = tmp_path / "my-wordpiece.json"
    tokenizer.write_text('{"model": {"type": "WordPiece"}}')
    save_pretrained(str(tmp_path / "out"), params, TINY, tokenizer_file=str(tokenizer))

    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_kind"] == kind and written["hidden_size"] == TINY.hidden_size
    assert (tmp_path / "out" / "tokenizer.json").read_text() == tokenizer.read_text()
    loaded, config = load_pretrained(str(tmp_path / "out"))
    assert config == TINY and infer_model_kind(loaded) == kind
    assert_trees_equal(params, loaded)


def test_save_pretrained_refuses_to_overwrite(tmp_path):
    params = random_params(MosaicBertForMaskedLM(TINY), seed=0)
    save_pretrained(str(tmp_path), params, TINY)
    with pytest.raises(ValueError, match="already exists"):
        save_pretrained(str(tmp_path), params, TINY)


def _save_training_steps(workdir, steps_and_params, config):
    """Writes checkpoints exactly as the training loop does (CheckpointManager, three items)."""
    optimizer = optax.adamw(1e-3, b2=0.98, weight_decay=0.02)
    manager = ocp.CheckpointManager(workdir / "checkpoints",
                                    item_names=("state", "data_state", "model_config"))
    for step, params in steps_and_params:
        params = jax.tree_util.tree_map(jnp.asarray, params)
        opt_state = optimizer.init(params)
        _, opt_state = optimizer.update(params, opt_state, params)  # non-trivial moments
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state,
                                         "step": jnp.asarray(step)}),
            data_state=ocp.args.JsonSave({"epoch": 0, "position": step * 8}),
            model_config=ocp.args.JsonSave(config_to_dict(config))))
    manager.wait_until_finished()
    manager.close()


def test_load_training_checkpoint_restores_params_only(tmp_path):
    model = MosaicBertForMaskedLM(TINY)
    old, new = random_params(model, seed=2), random_params(model, seed=3)
    _save_training_steps(tmp_path, [(100, old), (200, new)], TINY)

    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "200"):
        params, config = load_pretrained(str(path))
        assert config == TINY
        assert_trees_equal(new, params)
    params, _ = load_pretrained(str(tmp_path / "checkpoints" / "100"))
    assert_trees_equal(old, params)


def test_load_pretrained_errors(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(ValueError, match="no-such-run.*does not exist"):
        load_pretrained(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no MosaicBERT checkpoint; expected"):
        load_pretrained(str(tmp_path / "empty"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="no finished checkpoint step"):
        load_pretrained(str(tmp_path / "run"))


def test_load_pretrained_rejects_config_that_does_not_fit_the_weights(tmp_path):
    save_pretrained(str(tmp_path), random_params(MosaicBertForMaskedLM(TINY), seed=0), TINY)
    config_file = tmp_path / "config.json"
    values = json.loads(config_file.read_text())
    values["intermediate_size"] = 2 * TINY.intermediate_size
    config_file.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"gated_layers/kernel: \(128, 512\) "
                                         r"\(expected \(128, 1024\)\)"):
        load_pretrained(str(tmp_path))
