"""Continued pretraining (`config.init_from`): parameters from a checkpoint, the vocabulary
resized by token string when the data's tokenizer differs, and resume still exact."""

import os
import sys

import jax
import numpy as np
import pytest

from mosaicbert_jax.checkpoint import save_pretrained
from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.data.prepare import prepare
from mosaicbert_jax.data.sources import DocumentList
from mosaicbert_jax.data.tokenizer import padded_vocab_size, train_wordpiece
from mosaicbert_jax.model import MosaicBertForMaskedLM
from mosaicbert_jax.optim import recipe_optimizer
from mosaicbert_jax.sharding import make_mesh
from mosaicbert_jax.train import train_and_evaluate
from mosaicbert_jax.training.init_from import apply_init_from, read_vocab
from mosaicbert_jax.training.step import init_state

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402

COMMON = "the a of and to in is was for on with as by at from it that this be are".split()
TOPIC_A = "river mountain forest valley stone rain cloud winter harvest meadow".split()
TOPIC_B = "kernel tensor matrix compiler gradient vector memory thread socket buffer".split()


def texts_about(topic, seed, count=300):
    rng = np.random.default_rng(seed)
    words = COMMON + topic * 3
    return [" ".join(rng.choice(words, size=rng.integers(8, 30))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizers")
    paths = {}
    for name, topic, seed in (("a", TOPIC_A, 1), ("b", TOPIC_B, 2)):
        path = folder / f"{name}.json"
        train_wordpiece(texts_about(topic, seed), vocab_size=160).save(str(path))
        paths[name] = str(path)
    return paths


def fresh_state(vocab_size, seed=17):
    config = MosaicBertConfig.from_preset("tiny", vocab_size=vocab_size, dtype="float32")
    _, tx = recipe_optimizer(tiny.get_config().optimizer, 10)
    return init_state(MosaicBertForMaskedLM(config), tx, seed,
                      make_mesh({"data": -1, "fsdp": 1, "tensor": 1})), config


def pretrained_source(folder, tokenizer_file):
    """A save_pretrained folder of a tiny model whose every parameter is random (not an init:
    zeros and ones would not tell a copied row from a fresh one)."""
    vocab_size = padded_vocab_size(len(read_vocab(tokenizer_file)))
    (state, _), config = fresh_state(vocab_size, seed=99)
    rng = np.random.default_rng(5)
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + rng.normal(0, 0.5, x.shape).astype(np.float32),
        jax.device_get(state["params"]))
    save_pretrained(str(folder), params, config, tokenizer_file=tokenizer_file)
    return params


def embedding(params):
    return np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"])


def test_same_vocabulary_starts_from_the_source_exactly(tmp_path, tokenizers):
    source = pretrained_source(tmp_path / "source", tokenizers["a"])
    (state, _), config = fresh_state(embedding(source).shape[0])
    reports = []
    started = apply_init_from(str(tmp_path / "source"), state, 0, config, tokenizers["a"],
                              reports.append)
    got = jax.device_get(started["params"])
    for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(source)[0],
                                  jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(have, want, err_msg=jax.tree_util.keystr(path))
    assert int(started["step"]) == 0
    for before, after in zip(jax.tree_util.tree_leaves(state["opt_state"]),
                             jax.tree_util.tree_leaves(started["opt_state"])):
        np.testing.assert_array_equal(before, after)  # the optimizer stays fresh
    rows = embedding(source).shape[0]
    assert f"same vocabulary ({len(read_vocab(tokenizers['a']))} tokens), all {rows} rows kept" \
        in reports[0]


def test_different_vocabulary_keeps_shared_rows_and_inits_the_rest(tmp_path, tokenizers):
    source = pretrained_source(tmp_path / "source", tokenizers["a"])
    vocab_a, vocab_b = read_vocab(tokenizers["a"]), read_vocab(tokenizers["b"])
    shared = sorted(vocab_a.keys() & vocab_b.keys())
    assert 50 < len(shared) < len(vocab_b) - 20  # some tokens shared, some new (e.g. "kernel")
    rows = padded_vocab_size(len(vocab_b))
    (state, _), config = fresh_state(rows)
    fresh = jax.device_get(state["params"])
    reports = []
    started = jax.device_get(apply_init_from(str(tmp_path / "source"), state, 0, config,
                                             tokenizers["b"], reports.append)["params"])
    new_emb, old_emb, fresh_emb = embedding(started), embedding(source), embedding(fresh)
    new_bias, old_bias = started["cls"]["decoder_bias"], source["cls"]["decoder_bias"]
    for token in shared:
        np.testing.assert_array_equal(new_emb[vocab_b[token]], old_emb[vocab_a[token]])
        assert new_bias[vocab_b[token]] == old_bias[vocab_a[token]]
    kept = np.zeros(rows, bool)
    kept[[vocab_b[t] for t in shared]] = True
    np.testing.assert_array_equal(new_emb[~kept], fresh_emb[~kept])
    assert np.all(new_bias[~kept] == 0)  # the fresh init of the bias
    assert np.abs(new_emb[~kept] - fresh_emb[~kept]).max() == 0
    assert "kernel" in vocab_b and "kernel" not in vocab_a and not kept[vocab_b["kernel"]]
    # every other parameter is the source's
    for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(source)[0],
                                  jax.tree_util.tree_leaves(started)):
        if want.shape[0] != old_emb.shape[0]:
            np.testing.assert_array_equal(have, want, err_msg=jax.tree_util.keystr(path))
    assert (f"kept {len(shared)} of the data's {len(vocab_b)} tokens" in reports[0]
            and f"{rows - len(shared)} of {rows} rows initialised fresh" in reports[0])


def test_mismatched_model_size_is_one_clear_error(tmp_path, tokenizers):
    source = pretrained_source(tmp_path / "source", tokenizers["a"])
    config = MosaicBertConfig.from_preset("tiny", vocab_size=embedding(source).shape[0], hidden_size=64,
                                          intermediate_size=128, dtype="float32")
    _, tx = recipe_optimizer(tiny.get_config().optimizer, 10)
    state, _ = init_state(MosaicBertForMaskedLM(config), tx, 0,
                          make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
    with pytest.raises(ValueError, match=r"init_from .*in the checkpoint but .*preset"):
        apply_init_from(str(tmp_path / "source"), state, 0, config, tokenizers["a"], print)


def train_config(shards, init_from, steps=4):
    config = tiny.get_config()
    config.init_from = init_from
    config.data.source = "shards"
    config.data.shards_dir = shards
    config.data.seq_len = 32
    config.train.global_batch_size = 8
    config.train.steps = steps
    config.train.log_every = 2
    config.train.eval_every = 4
    config.train.eval_batches = 1
    config.train.checkpoint_every = 2
    config.train.async_checkpointing = False
    return config


def test_training_from_init_from_with_a_new_vocab_resumes_exactly(tmp_path, tokenizers, capsys):
    from tokenizers import Tokenizer
    pretrained_source(tmp_path / "source", tokenizers["a"])
    shards = str(tmp_path / "shards_b")
    prepare(shards, Tokenizer.from_file(tokenizers["b"]), DocumentList(texts_about(TOPIC_B, 3)),
            eval_fraction=0.2, progress=False)
    source = str(tmp_path / "source")
    full = train_and_evaluate(train_config(shards, source), str(tmp_path / "full"))
    assert "vocabulary resized: kept" in capsys.readouterr().out
    train_and_evaluate(train_config(shards, source), str(tmp_path / "split"), stop_after=2)
    capsys.readouterr()
    resumed = train_and_evaluate(train_config(shards, source), str(tmp_path / "split"))
    assert resumed["resumed_from"] == 2
    assert f"init_from={source} ignored: resuming from step 2" in capsys.readouterr().out
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(full["state"]["params"])),
                    jax.tree_util.tree_leaves(jax.device_get(resumed["state"]["params"]))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seq_len", [512, 1024, 2048])
def test_phase2_configs_load_validate_and_keep_the_recipes_tokens_per_batch(seq_len):
    import importlib
    from mosaicbert_jax.checkpoint import checkpoint_kind
    from mosaicbert_jax.train import check_batch_layout
    from mosaicbert_jax.training.defaults import validate_config
    config = importlib.import_module(f"phase2_{seq_len}").get_config()
    validate_config(config)
    assert config.data.seq_len == seq_len and config.model.preset == "base"
    assert config.train.global_batch_size * seq_len == 4096 * 128
    assert config.optimizer.lr < tiny.get_default_config().optimizer.lr  # below the 5e-4 peak
    check_batch_layout(config.train.global_batch_size, config.train.microbatches, 8, 1)
    with pytest.raises(ValueError, match="REQUIRED:--config.init_from"):
        checkpoint_kind(config.init_from)  # forgetting init_from is an error, not a fresh start
