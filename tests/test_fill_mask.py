"""fill-mask: predictions equal a softmax over the full model's logits, the command line on every
checkpoint layout (save_pretrained folder, training workdir, one step), and its error messages."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_jax.checkpoint import config_to_dict, save_pretrained
from mosaicbert_jax.data.tokenizer import load_tokenizer
from mosaicbert_jax.fill_mask import encode_masked, fill_mask, main
from mosaicbert_jax.training.resume import TrainCheckpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "park", "is", "was", "big",
         "small", "and", "it", "in", "house", ".", ",", "##s", "red", "blue", "tree", "under",
         "bird", "sang"]  # 32 ids with the specials; the model's vocabulary is 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A randomly initialised tiny MLM saved with save_pretrained, plus its vocab.txt."""
    root = tmp_path_factory.mktemp("fill_mask")
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("\n".join(SPECIALS + WORDS) + "\n")
    config = MosaicBertConfig.tiny(vocab_size=64, hidden_size=32, num_attention_heads=2,
                                   num_hidden_layers=2, intermediate_size=64)
    ids = np.ones((1, 8), np.int32)
    params = MosaicBertForMaskedLM(config).init(jax.random.key(3), ids, ids)["params"]
    # Random init gives near-uniform predictions; a larger decoder bias makes them distinct.
    params = jax.tree_util.tree_map(np.asarray, params)
    params["cls"]["decoder_bias"] = np.random.default_rng(0).normal(0, 2, 64).astype(np.float32)
    save_pretrained(str(root / "pretrained"), params, config, tokenizer_file=str(vocab_file))
    return root, params, config


def _reference_top_k(params, config, tokenizer, text, top_k):
    """Softmax over the tokenizer's ids of the full (dense-head) logits at each [MASK]."""
    ids, positions = encode_masked(tokenizer, text)
    logits = MosaicBertForMaskedLM(config).apply(
        {"params": params}, ids[None], np.ones((1, len(ids)), np.int32))[0]
    logits = np.asarray(logits, np.float64)[positions][:, :tokenizer.get_vocab_size()]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)[:, :top_k]
    return [[(tokenizer.id_to_token(int(i)), float(p[i])) for i in row]
            for row, p in zip(order, probs)]


def test_predictions_are_the_mlm_softmax_at_each_mask(model_dir):
    root, params, config = model_dir
    tokenizer = load_tokenizer(str(root / "vocab.txt"))
    text = "The [MASK] sat on the [MASK] under a big tree."
    result = fill_mask(params, config, tokenizer, text, top_k=6)
    assert len(result) == 2 and all(len(row) == 6 for row in result)
    for row in result:
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 < p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6
        assert all(token in SPECIALS + WORDS for token, _ in row)  # never a padding id
    expected = _reference_top_k(params, config, tokenizer, text, 6)
    for row, want in zip(result, expected):
        assert [t for t, _ in row] == [t for t, _ in want]
        np.testing.assert_allclose([p for _, p in row], [p for _, p in want], rtol=1e-4)
    # All of the vocabulary: the probabilities of one mask sum to one.
    everything = fill_mask(params, config, tokenizer, "a [MASK]", top_k=len(SPECIALS + WORDS))
    assert sum(p for _, p in everything[0]) == pytest.approx(1.0, abs=1e-5)


def test_command_line_on_a_pretrained_folder(model_dir):
    root, params, config = model_dir
    text = "the cat [MASK] on the mat"
    result = subprocess.run(
        [sys.executable, "-m", "mosaicbert_jax.fill_mask", "--checkpoint",
         str(root / "pretrained"), "--top-k", "3", "--json", text, "a [MASK] [MASK] ran"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    tokenizer = load_tokenizer(str(root / "vocab.txt"))
    expected = _reference_top_k(params, config, tokenizer, text, 3)[0]
    predictions = first["masks"][0]["predictions"]
    assert first["text"] == text and first["masks"][0]["position"] == 3
    assert [p["token"] for p in predictions] == [t for t, _ in expected]
    np.testing.assert_allclose([p["probability"] for p in predictions],
                               [p for _, p in expected], rtol=1e-4)
    assert first["filled"] == text.replace("[MASK]", expected[0][0])
    assert [m["position"] for m in second["masks"]] == [2, 3]


def test_command_line_on_a_training_workdir(model_dir, tmp_path, capsys):
    """The trainer's layout: <workdir>/checkpoints/<step>/{state,model_config,...} with the
    data's tokenizer saved in <workdir>."""
    root, params, config = model_dir
    workdir = tmp_path / "run"
    checkpoints = TrainCheckpoints(str(workdir), async_save=False)
    state = {"params": params, "opt_state": {"count": np.zeros((), np.int32)},
             "step": np.asarray(7, np.int32)}
    checkpoints.save(7, state, {"batch_index": 7}, config_to_dict(config))
    checkpoints.close()

    args = ["the [MASK] ran to the park ."]
    assert main(["--checkpoint", str(workdir), *args]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer found with the checkpoint" in err and "--tokenizer" in err

    (workdir / "vocab.txt").write_text((root / "vocab.txt").read_text())
    for checkpoint in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "7"):
        assert main(["--checkpoint", str(checkpoint), "--top-k", "2", *args]) == 0
        out = capsys.readouterr().out
        assert out.startswith("the [MASK] ran to the park .\n  [MASK] 1 of 1 (token 2):\n")
        assert "     1. " in out and "     2. " in out and "top-1 filled: the " in out
    tokenizer = load_tokenizer(str(root / "vocab.txt"))
    top = fill_mask(params, config, tokenizer, args[0], top_k=2)[0]
    assert f"     1. {top[0][0]:<20s} {top[0][1]:.4f}" in out


def test_clear_errors(model_dir, tmp_path, capsys):
    root, params, config = model_dir
    tokenizer = load_tokenizer(str(root / "vocab.txt"))
    with pytest.raises(ValueError, match=r"no \[MASK\] token in the text 'the cat sat'"):
        fill_mask(params, config, tokenizer, "the cat sat")
    with pytest.raises(ValueError, match=r"write it in capitals"):
        fill_mask(params, config, tokenizer, "the [mask] sat")
    with pytest.raises(ValueError, match="top_k=0 must be at least 1"):
        fill_mask(params, config, tokenizer, "the [MASK]", top_k=0)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        fill_mask(params, config, tokenizer, "the [MASK]", top_k=33)
    small = config.replace(vocab_size=16)
    with pytest.raises(ValueError, match="does not belong to this model"):
        fill_mask(params, small, tokenizer, "the [MASK]")
    classifier = {"bert": params["bert"], "pooler_dense": {}, "classifier": {}}
    with pytest.raises(ValueError, match="classification model"):
        fill_mask(classifier, config, tokenizer, "the [MASK]")

    assert main(["--checkpoint", str(tmp_path / "missing"), "a [MASK]"]) == 2
    assert "does not exist" in capsys.readouterr().err
    pretrained = str(root / "pretrained")
    assert main(["--checkpoint", pretrained, "no mask here"]) == 2
    assert "no [MASK] token" in capsys.readouterr().err
    assert main(["--checkpoint", pretrained, "--tokenizer", str(tmp_path / "nope.json"),
                 "a [MASK]"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inputs_far_past_the_training_length_get_a_warning(model_dir, tmp_path, capsys):
    root, params, config = model_dir
    workdir = tmp_path / "run"
    checkpoints = TrainCheckpoints(str(workdir), async_save=False)
    state = {"params": params, "opt_state": {"count": np.zeros((), np.int32)},
             "step": np.asarray(3, np.int32)}
    checkpoints.save(3, state, {"batch_index": 3}, config_to_dict(config),
                     {"train_steps": 3, "optimizer": {}, "seq_len": 16})
    checkpoints.close()
    (workdir / "vocab.txt").write_text((root / "vocab.txt").read_text())
    short, long = "the [MASK] sat", "the [MASK] sat on the mat ." + " the cat ran ." * 8
    assert main(["--checkpoint", str(workdir), short]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["--checkpoint", str(workdir), long]) == 0  # 2 + 7 + 32 = 41 tokens > 2 x 16
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "warning: the text has 41 tokens, far past the 16 tokens the model was trained on; "
        "ALiBi extrapolates to longer inputs, but not without limit: expect worse "
        "predictions, or split the text"]
    assert "top-1 filled" in captured.out  # still answered

    # A save_pretrained folder does not know its training length: warned past 512 tokens.
    very_long = "the [MASK] sat ." + " the cat ran ." * 130  # 2 + 4 + 520 tokens
    assert main(["--checkpoint", str(root / "pretrained"), very_long]) == 0
    err = capsys.readouterr().err
    assert "the text has 526 tokens, far past 512 tokens (the model's training length is " \
           "unknown)" in err
