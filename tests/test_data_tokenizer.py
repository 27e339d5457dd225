"""WordPiece tokenizers: training offline, loading from tokenizer.json / vocab.txt / dir / hub."""

import pytest

from mosaicbert_jax.data.tokenizer import (SpecialTokens, load_tokenizer, padded_vocab_size,
                                           special_tokens, train_wordpiece)

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Packing documents into rows keeps every token of the corpus and wastes no compute.",
    "A tokenizer splits words into word pieces; rare words become several pieces.",
    "Masked language modelling hides some tokens and asks the model to predict them.",
] * 25


@pytest.fixture(scope="module")
def trained():
    return train_wordpiece(TEXTS, vocab_size=300)


def test_padded_vocab_size():
    assert padded_vocab_size(30522) == 30528
    assert padded_vocab_size(64) == 64 and padded_vocab_size(65) == 128
    assert padded_vocab_size(8000, multiple=128) == 8064
    with pytest.raises(ValueError):
        padded_vocab_size(0)


def test_trained_tokenizer_is_bert_like(trained):
    ids = special_tokens(trained)
    assert ids == SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
    assert trained.get_vocab_size() <= 300
    single = trained.encode("The Quick fox")
    assert single.tokens[0] == "[CLS]" and single.tokens[-1] == "[SEP]"
    assert single.tokens[1:3] == ["the", "quick"], "lowercased"
    pair = trained.encode("the dog", "the fox sleeps")
    first_sep = pair.ids.index(ids.sep)
    assert pair.ids[0] == ids.cls and pair.ids[-1] == ids.sep
    assert pair.type_ids == [0] * (first_sep + 1) + [1] * (len(pair.ids) - first_sep - 1)


def test_training_is_deterministic(trained):
    again = train_wordpiece(iter(TEXTS), vocab_size=300)
    assert again.get_vocab() == trained.get_vocab()


def test_load_from_json_vocab_txt_and_directory(trained, tmp_path):
    json_path = tmp_path / "json" / "tokenizer.json"
    json_path.parent.mkdir()
    trained.save(str(json_path))
    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    by_id = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    (vocab_dir / "vocab.txt").write_text("".join(token + "\n" for token, _ in by_id))
    text, pair = "The lazy dog jumps!", "Rare words become pieces."
    expected = trained.encode(text, pair)
    for source in (json_path, json_path.parent, vocab_dir / "vocab.txt", vocab_dir):
        loaded = load_tokenizer(str(source))
        encoding = loaded.encode(text, pair)
        assert encoding.ids == expected.ids and encoding.type_ids == expected.type_ids
        assert special_tokens(loaded).pad == 0


def test_vocab_without_pad_first_is_rejected(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    with pytest.raises(ValueError, match=r"\[PAD\] has id 1"):
        load_tokenizer(str(vocab))


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    for missing in (str(tmp_path / "tokenizer.json"), str(tmp_path / "a" / "vocab.txt"),
                    "./no_such_dir"):
        with pytest.raises(ValueError, match="does not exist"):
            load_tokenizer(missing)
    with pytest.raises(ValueError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(str(tmp_path))


def test_hub_name_offline_says_to_pass_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline.*vocab.txt"):
        load_tokenizer("mosaicbert-jax-tests/no-such-tokenizer")
