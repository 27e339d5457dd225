"""prepare: corpus -> sharded token files; exactness, resume, errors, CLI, the embedded default."""

import json
import os
import signal
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
from mosaicbert_jax.cli_errors import UserError
from mosaicbert_jax.data.prepare import holdout_mask, prepare
from mosaicbert_jax.data.shards import partial_dir
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

    def __init__(self, texts, fail_after, error=KeyboardInterrupt("interrupted")):
        self.texts, self.fail_after, self.error = texts, fail_after, error

    def __iter__(self):
        for index, text in enumerate(self.texts):
            if index == self.fail_after:
                raise self.error
            yield text


def test_interrupted_prepare_resumes_and_matches_an_uninterrupted_one(tmp_path, texts, tokenizer):
    options = dict(eval_fraction=0.1, shard_documents=50, chunk_documents=20, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "resumed"), tokenizer, FailingSource(texts, 170), **options)
    assert not (tmp_path / "resumed").exists(), "nothing in --out until it is complete"
    partial = partial_dir(str(tmp_path / "resumed"))
    done = sorted(p for p in os.listdir(os.path.join(partial, "train")) if p.endswith(".json"))
    assert done, "the shards finished before the interruption are kept"
    written = {p: os.stat(os.path.join(partial, "train", p)).st_mtime_ns for p in done}
    time.sleep(0.01)
    prepare(str(tmp_path / "resumed"), tokenizer, DocumentList(texts), **options)
    assert not os.path.exists(partial)
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


def test_empty_corpus_is_a_clear_error_and_leaves_nothing(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="has no documents.*nothing was written"):
        prepare(str(tmp_path / "out"), tokenizer, open_source(f"jsonl:{tmp_path}/empty.jsonl"),
                progress=False)
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]


def test_a_failure_after_some_shards_keeps_them_and_a_different_command_starts_over(
        tmp_path, texts, tokenizer):
    out = str(tmp_path / "out")
    options = dict(shard_documents=50, chunk_documents=25, progress=False)
    bad = FailingSource(texts, 120, UserError("corpus.jsonl:121: not valid JSON"))
    with pytest.raises(UserError, match=r"corpus.jsonl:121.*the \d shard\(s\) finished so far "
                                        r"are kept in .*\.out\.partial.*same command resumes"):
        prepare(out, tokenizer, bad, **options)
    assert not os.path.exists(out) and os.path.isdir(partial_dir(out))
    # A different command (here another eval split) discards the partial build, not refuses it.
    meta = prepare(out, tokenizer, DocumentList(texts), eval_fraction=0.25, **options)
    assert set(meta["splits"]) == {"train", "eval"} and not os.path.exists(partial_dir(out))
    assert meta["splits"]["train"]["num_documents"] + meta["splits"]["eval"][
        "num_documents"] == len([t for t in texts if t])


def test_an_out_dir_holding_something_else_is_refused(tmp_path, texts, tokenizer):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"out exists and is not a prepared shards dir \(it "
                                        r"holds notes.txt\); give a new --out"):
        prepare(str(tmp_path / "out"), tokenizer, DocumentList(texts[:20]), progress=False)
    assert os.listdir(tmp_path / "out") == ["notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    prepare(str(tmp_path / "empty"), tokenizer, DocumentList(texts[:20]), progress=False)
    assert read_metadata(str(tmp_path / "empty"))["splits"]["train"]["num_documents"] == 19


def _prepare_command(out, corpus, *extra):
    return [sys.executable, "-m", "mosaicbert_jax.data.prepare", "--out", str(out),
            "--train", f"jsonl:{corpus}", *extra]


@pytest.mark.parametrize("mistake", ["field", "empty"])
def test_cli_mistake_is_one_line_and_the_corrected_command_runs(tmp_path, texts, mistake):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:100] if t))
    (tmp_path / "empty.jsonl").write_text("")
    wrong, right = {"field": (["--text-field", "text"], ["--text-field", "body"]),
                    "empty": (["--eval", f"jsonl:{tmp_path}/empty.jsonl?field=body"],
                              ["--eval-fraction", "0.1"])}[mistake]
    common = ["--text-field", "body"] if mistake == "empty" else []
    tokenizer_args = ["--train-tokenizer", "300", "--quiet"]
    failed = subprocess.run(_prepare_command(tmp_path / "out", corpus, *common, *wrong,
                                             *tokenizer_args),
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    expected = {"field": "no string field 'text' (found ['body'])",
                "empty": "eval corpus 'jsonl:" + str(tmp_path) + "/empty.jsonl?field=body' has "
                         "no documents"}[mistake]
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], failed.stderr
    assert "Traceback" not in failed.stderr
    left = sorted(os.listdir(tmp_path))
    if mistake == "field":  # failed at the first document: nothing at all is left
        assert left == ["corpus.jsonl", "empty.jsonl"]
    else:  # the train shards were done: kept aside (not in --out) for the same command
        assert left == [".out.partial", "corpus.jsonl", "empty.jsonl"]
        assert "kept in" in lines[-1] and "rm -r" in lines[-1]
    fixed = subprocess.run(_prepare_command(tmp_path / "out", corpus, *common, *right,
                                            *tokenizer_args),
                           capture_output=True, text=True, timeout=120)
    assert fixed.returncode == 0, fixed.stderr
    assert read_metadata(str(tmp_path / "out"))["splits"]["train"]["num_documents"] > 50


def test_kill_9_during_prepare_then_the_same_command_completes(tmp_path, texts, tokenizer):
    documents = [t for t in embedded_documents() * 2 if t]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "out"
    command = _prepare_command(out, corpus, "--tokenizer", str(tmp_path / "tokenizer.json"),
                               "--shard-documents", "40", "--chunk-documents", "40",
                               "--threads", "1", "--quiet")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_markers = os.path.join(partial_dir(str(out)), "train", "00002.json")
    deadline = time.monotonic() + 120
    while not os.path.exists(first_markers) and process.poll() is None:
        assert time.monotonic() < deadline, "prepare wrote no shard in 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "prepare finished before it was killed"
    assert not out.exists()
    finished = sorted(p for p in os.listdir(os.path.join(partial_dir(str(out)), "train"))
                      if p.endswith(".json"))
    assert 3 <= len(finished) < len(documents) // 40
    first_mtime = os.stat(os.path.join(partial_dir(str(out)), "train", "00000.json")).st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    meta = read_metadata(str(out))
    assert meta["splits"]["train"]["num_documents"] == len(documents)
    assert len(meta["splits"]["train"]["shards"]) == -(-len(documents) // 40)
    assert os.stat(out / "train" / "00000.json").st_mtime_ns == first_mtime, "resumed, not redone"
    assert not os.path.exists(partial_dir(str(out)))
    ids = encode_as_prepare_does(tokenizer, documents[-50:])
    assert [d.tolist() for d in read_documents(str(out), "train")][-50:] == ids


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


@pytest.fixture()
def prepared(tmp_path, texts, tokenizer):
    out = tmp_path / "shards"
    prepare(str(out), tokenizer, DocumentList(texts), shard_documents=100, progress=False)
    return out


def _truncate(path, keep_bytes):
    with open(path, "r+b") as handle:
        handle.truncate(keep_bytes)


@pytest.mark.parametrize("damage, expected", [
    ("tokens", r"00001.tokens.npy is damaged \(truncated: [\d,]+ bytes, expected"),
    ("offsets", r"00001.offsets.npy is damaged \(truncated"),
    ("header", r"00001.tokens.npy is damaged: not a readable .npy file"),
    ("missing", r"shard file \S+00001.offsets.npy is missing"),
    ("ids", r"00001.tokens.npy holds token id 65535, beyond the vocabulary of 1000 ids"),
    ("shape", r"00001.tokens.npy holds a uint16 array of shape \(5,\), but the metadata says"),
])
def test_a_damaged_shard_is_an_error_naming_its_file(prepared, damage, expected):
    stem = prepared / "train" / "00001"
    tokens = np.load(f"{stem}.tokens.npy")
    if damage == "tokens":
        _truncate(f"{stem}.tokens.npy", os.path.getsize(f"{stem}.tokens.npy") - 100)
    elif damage == "offsets":
        _truncate(f"{stem}.offsets.npy", os.path.getsize(f"{stem}.offsets.npy") - 8)
    elif damage == "header":
        _truncate(f"{stem}.tokens.npy", 20)
    elif damage == "missing":
        os.remove(f"{stem}.offsets.npy")
    elif damage == "ids":
        tokens[len(tokens) // 2] = 65535
        np.save(f"{stem}.tokens.npy", tokens)
    elif damage == "shape":
        np.save(f"{stem}.tokens.npy", tokens[:5])
    with pytest.raises(UserError, match=expected) as error:
        MLMBatches(str(prepared), "train", batch_size=2, seq_len=64)
    assert f"delete {prepared} and run its prepare command again" in str(error.value)
    assert "prepare.json" in str(error.value)


def test_ids_are_checked_from_the_metadata_for_splits_too_large_to_scan(prepared, monkeypatch):
    """Large splits are not scanned when opened; prepare's per-shard max_id is checked instead."""
    from mosaicbert_jax.data import shards

    meta = read_metadata(str(prepared))
    assert all(0 < s["max_id"] < 1000 for s in meta["splits"]["train"]["shards"])
    monkeypatch.setattr(shards, "FULL_SCAN_TOKENS", 0)
    MLMBatches(str(prepared), "train", batch_size=2, seq_len=64)  # clean: opens
    meta["vocab_size"] = 7  # as if the shards had been made with another, larger vocabulary
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"00000.tokens.npy holds token id \d+, beyond the "
                                        r"vocabulary of 7 ids"):
        MLMBatches(str(prepared), "train", batch_size=2, seq_len=64)


def test_a_directory_that_is_not_a_shards_dir(tmp_path, texts, tokenizer):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"stuff is not a prepared shards dir \(it has no "
                                        r"meta.json\)"):
        read_metadata(str(tmp_path / "stuff"))
    with pytest.raises(UserError, match="a.txt is a file, not a prepared shards dir"):
        read_metadata(str(tmp_path / "stuff" / "a.txt"))
    (tmp_path / "stuff" / "meta.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a mosaicbert-jax-shards v1 metadata file"):
        read_metadata(str(tmp_path / "stuff"))
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "half"), tokenizer, FailingSource(texts, 170),
                shard_documents=50, chunk_documents=20, progress=False)
    with pytest.raises(UserError, match=r"the preparation of \S+half did not finish \(its "
                                        r"partial build is \S+\.half\.partial\); rerun the same"):
        read_metadata(str(tmp_path / "half"))


def test_an_unfinished_dir_of_the_older_in_place_layout_resumes(tmp_path, texts, tokenizer):
    """Older versions prepared in --out itself; such an unfinished dir is moved aside and resumed."""
    out = str(tmp_path / "out")
    options = dict(shard_documents=50, chunk_documents=20, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare(out, tokenizer, FailingSource(texts, 170), **options)
    os.rename(partial_dir(out), out)  # the layout an older version left behind
    marker = os.path.join(out, "train", "00000.json")
    mtime = os.stat(marker).st_mtime_ns
    with pytest.raises(UserError, match="did not finish"):
        read_metadata(out)
    meta = prepare(out, tokenizer, DocumentList(texts), **options)
    assert meta["splits"]["train"]["num_documents"] == len([t for t in texts if t])
    assert os.stat(marker).st_mtime_ns == mtime and not os.path.exists(partial_dir(out))
