"""Document sources: text, JSON Lines, Parquet, Hugging Face datasets, the embedded corpus."""

import gzip
import json
import os
import subprocess
import sys
import time

import pytest

from mosaicbert_jax.data.corpus import embedded_documents
from mosaicbert_jax.data.sources import JsonLines, TextFiles, open_source

DOCS = ["First document, one line.", "Second document:\nit has two lines.", "Third."]


def test_text_lines_and_paragraphs(tmp_path):
    (tmp_path / "lines.txt").write_text("alpha beta\n\n  \ngamma\ndelta epsilon\n")
    assert list(open_source(f"text:{tmp_path}/lines.txt")) == ["alpha beta", "gamma",
                                                               "delta epsilon"]
    (tmp_path / "paras.txt").write_text("\n\n".join(DOCS) + "\n")
    source = open_source(f"text:{tmp_path}/paras.txt?mode=paragraphs")
    assert list(source) == DOCS


def test_directories_globs_and_gzip(tmp_path):
    (tmp_path / "b.txt").write_text("from b\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt") as handle:
        handle.write("from a\n")
    (tmp_path / "skip.md").write_text("not text\n")
    assert list(TextFiles(str(tmp_path))) == ["from a", "from b"]
    assert list(TextFiles(str(tmp_path / "*.txt"))) == ["from b"]


def test_jsonl_field_and_missing_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    assert list(open_source(f"jsonl:{path}?field=content")) == DOCS
    with pytest.raises(ValueError, match=r"docs.jsonl:1: no string field 'text'.*'content'"):
        list(JsonLines(str(path)))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(JsonLines(str(tmp_path / "bad.jsonl")))


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "docs.parquet")
    assert list(open_source(f"parquet:{tmp_path}/docs.parquet")) == DOCS
    with pytest.raises(ValueError, match="no column 'body'"):
        list(open_source(f"parquet:{tmp_path}?column=body"))


def test_parquet_missing_column_in_prepare_is_one_line_without_traceback(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCS}), tmp_path / "docs.parquet")
    result = subprocess.run(
        [sys.executable, "-m", "mosaicbert_jax.data.prepare", "--out", str(tmp_path / "out"),
         "--train", f"parquet:{tmp_path}/docs.parquet", "--train-tokenizer", "200", "--quiet"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "docs.parquet has no column 'text' (columns: " \
        "['content']); pass ?column=NAME" in last, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["docs.parquet"]


def test_huggingface_datasets_local_json(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert list(open_source(f"hf:json?data_files={path}&split=train")) == DOCS


def test_missing_or_empty_corpus_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_source(f"jsonl:{tmp_path}/missing.jsonl")
    with pytest.raises(ValueError, match="holds no"):
        open_source(f"text:{tmp_path}")
    with pytest.raises(ValueError, match="matches no files"):
        open_source(f"text:{tmp_path}/*.txt")
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source("csv:/data/x.csv")
    with pytest.raises(ValueError, match="unknown option"):
        open_source(f"text:{tmp_path}?column=x")


def test_embedded_corpus_is_real_english_and_deterministic():
    start = time.perf_counter()
    documents = embedded_documents()
    assert time.perf_counter() - start < 10
    assert len(documents) > 1000
    assert sum(map(len, documents)) > 1_000_000
    assert documents == embedded_documents()
    lengths = sorted(len(d) for d in documents)
    assert lengths[0] >= 100 and lengths[-1] > 20 * lengths[len(lengths) // 2], "long-tailed"
    text = " ".join(documents[:200]).lower()
    for word in (" the ", " of ", " is ", " and "):
        assert text.count(word) > 100
    assert ">>>" not in "".join(documents)
