"""prepare: corpus -> sharded token files; exactness, resume, errors, CLI, the embedded default."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from mosaicbert_jax import MosaicBertConfig
from mosaicbert_jax.data import MLMBatches, check_vocab_fits, read_documents, read_metadata
from mosaicbert_jax.data.corpus import embedded_documents
from mosaicbert_jax.data.embedded import prepare_embedded
from mosaicbert_jax.data.prepare import holdout_mask, prepare
from mosaicbert_jax.data.sources import DocumentList, open_source
from mosaicbert_jax.data.tokenizer import train_wordpiece


@pytest.fixture(scope="module")
def texts():
    documents = embedded_documents()[:300]
    return documents[:10] + ["", "Literal [MASK] and [CLS] tokens stay text."] + documents[10:]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_wordpiece(texts, vocab_size=1000)


def encode_as_prepare_does(tokenizer, texts):
    """Token ids of each text, with "[MASK]"-like strings in the text read as plain words."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return [e.ids for e in copy.encode_batch(texts, add_special_tokens=False)]


def test_shards_hold_exactly_the_tokenized_documents(tmp_path, texts, tokenizer):
    meta = prepare(str(tmp_path), tokenizer, DocumentList(texts), eval_fraction=0.2,
                   shard_documents=64, chunk_documents=16, progress=False)
    held_out = holdout_mask(0, len(texts), 0.2)
    assert 0.1 < held_out.mean() < 0.3
    for split, chosen in (("train", ~held_out), ("eval", held_out)):
        expected = encode_as_prepare_does(tokenizer, [t for t, c in zip(texts, chosen) if c and t])
        got = [d.tolist() for d in read_documents(str(tmp_path), split)]
        assert got == expected
        assert meta["splits"][split]["num_documents"] == len(expected)
        assert meta["splits"][split]["num_tokens"] == sum(map(len, expected))
    assert meta["empty_documents_skipped"] == 1
    assert meta["vocab_size"] == tokenizer.get_vocab_size()
    assert meta["padded_vocab_size"] % 64 == 0
    assert meta["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert len(meta["splits"]["train"]["shards"]) == 5  # 302 documents, 64 a shard
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).to_str() == tokenizer.to_str()
    literal, = encode_as_prepare_does(tokenizer, [texts[11]])
    assert 4 not in literal and 2 not in literal


class FailingSource:
    """The documents of `texts`, but reading stops with an error after `fail_after` of them."""

    spec = "list"

    def __init__(self, texts, fail_after):
        self.texts, self.fail_after = texts, fail_after

    def __iter__(self):
        for index, text in enumerate(self.texts):
            if index == self.fail_after:
                raise KeyboardInterrupt("interrupted")
            yield text


def test_interrupted_prepare_resumes_and_matches_an_uninterrupted_one(tmp_path, texts, tokenizer):
    options = dict(eval_fraction=0.1, shard_documents=50, chunk_documents=20, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "resumed"), tokenizer, FailingSource(texts, 170), **options)
    assert not (tmp_path / "resumed" / "meta.json").exists()
    done = sorted(p for p in os.listdir(tmp_path / "resumed" / "train") if p.endswith(".json"))
    assert done, "shards finished before the interruption are kept"
    written = {p: os.stat(tmp_path / "resumed" / "train" / p).st_mtime_ns for p in done}
    time.sleep(0.01)
    prepare(str(tmp_path / "resumed"), tokenizer, DocumentList(texts), **options)
    for p, mtime in written.items():
        assert os.stat(tmp_path / "resumed" / "train" / p).st_mtime_ns == mtime, "not redone"
    prepare(str(tmp_path / "straight"), tokenizer, DocumentList(texts), **options)
    for split in ("train", "eval"):
        resumed = list(read_documents(str(tmp_path / "resumed"), split))
        straight = list(read_documents(str(tmp_path / "straight"), split))
        assert len(resumed) == len(straight)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, straight))


def test_rejects_a_different_preparation_in_the_same_dir(tmp_path, texts, tokenizer):
    prepare(str(tmp_path), tokenizer, DocumentList(texts[:50]), progress=False)
    with pytest.raises(ValueError, match="different preparation.*eval_fraction"):
        prepare(str(tmp_path), tokenizer, DocumentList(texts[:50]), eval_fraction=0.5,
                progress=False)


def test_empty_corpus_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no documents"):
        prepare(str(tmp_path / "out"), tokenizer, open_source(f"jsonl:{tmp_path}/empty.jsonl"),
                progress=False)


def test_cli_trains_a_vocabulary_and_prepares(tmp_path, texts):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(t for t in texts if t) + "\n")
    command = [sys.executable, "-m", "mosaicbert_jax.data.prepare", "--out", str(tmp_path / "out"),
               "--train", f"text:{corpus}?mode=paragraphs", "--eval-fraction", "0.1",
               "--train-tokenizer", "500", "--shard-documents", "100"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    paragraphs = len(list(open_source(f"text:{corpus}?mode=paragraphs")))
    assert summary["splits"]["train"]["shards"] == -(-paragraphs // 100)
    assert summary["padded_vocab_size"] == 512
    assert "docs" in result.stderr, "a progress line"
    batches = MLMBatches(str(tmp_path / "out"), "eval", batch_size=2, seq_len=64, repeat=False)
    assert all(b["input_ids"].max() < 512 for b in batches)


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory):
    return prepare_embedded(str(tmp_path_factory.mktemp("cache")), vocab_size=4096)


def test_prepare_embedded_builds_once_and_feeds_batches(embedded_dir):
    meta = read_metadata(embedded_dir)
    assert set(meta["splits"]) == {"train", "eval"}
    assert meta["splits"]["train"]["num_tokens"] > 200_000
    assert meta["vocab_size"] <= 4096 and meta["padded_vocab_size"] % 64 == 0
    meta_mtime = os.stat(os.path.join(embedded_dir, "meta.json")).st_mtime_ns
    start = time.perf_counter()
    assert prepare_embedded(os.path.dirname(embedded_dir), vocab_size=4096) == embedded_dir
    assert time.perf_counter() - start < 1
    assert os.stat(os.path.join(embedded_dir, "meta.json")).st_mtime_ns == meta_mtime
    config = MosaicBertConfig.tiny(vocab_size=meta["padded_vocab_size"])
    check_vocab_fits(meta["vocab_size"], config.vocab_size)
    batch = next(MLMBatches(embedded_dir, "train", batch_size=4, seq_len=128))
    assert batch["input_ids"].max() < config.vocab_size


def test_vocab_too_large_for_the_model_is_a_clear_error():
    with pytest.raises(ValueError, match=r"30522 ids, padded 30528.*vocab_size=8192"):
        check_vocab_fits(30522, MosaicBertConfig.tiny(vocab_size=8192).vocab_size)
