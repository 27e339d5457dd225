"""Document sources behind one interface: iterate a source to get its documents as strings.

Every source has a `spec` string (how `prepare` names it, recorded in the shards' metadata):
    text:PATH[?mode=lines|paragraphs]   .txt files: one document per line, or blank-line separated
    jsonl:PATH[?field=text]             JSON Lines with a text field (.jsonl / .json, .gz too)
    parquet:PATH[?column=text]          Parquet files with a string column (needs pyarrow)
    tfds:c4/en[?split=train&data_dir=DIR]  TensorFlow Datasets (see tfds_source.py)
    seqio:TASK[?split=train&field=text]    a seqio Task or Mixture (see seqio_source.py)
    hf:NAME[?config=en&split=train&field=text&data_files=...]  Hugging Face datasets
    embedded                             the embedded default corpus (mosaicbert_jax.data.corpus)
PATH is a file, a directory (searched recursively) or a glob pattern.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import urllib.parse
from typing import Iterable, Iterator, List, Sequence

from mosaicbert_jax.cli_errors import UserError

_TEXT_SUFFIXES = (".txt", ".text", ".txt.gz")
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)


def resolve_paths(location: str, suffixes: Sequence[str]) -> List[str]:
    """Sorted files named by a file, a directory (recursive, by suffix) or a glob pattern."""
    location = os.path.expanduser(location)
    if any(c in location for c in "*?["):
        paths = sorted(p for p in glob.glob(location, recursive=True) if os.path.isfile(p))
        if not paths:
            raise UserError(f"corpus pattern {location!r} matches no files")
        return paths
    if os.path.isfile(location):
        return [location]
    if os.path.isdir(location):
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(location)
                       for name in names if name.endswith(tuple(suffixes)))
        if not paths:
            raise UserError(f"corpus directory {location} holds no {'/'.join(suffixes)} files")
        return paths
    raise UserError(f"corpus path {location!r} does not exist; pass an existing file, "
                     f"directory or glob pattern")


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


class DocumentList:
    """Documents already in memory (a list of strings)."""

    def __init__(self, documents: Sequence[str], spec: str = "list"):
        self.documents = documents
        self.spec = spec

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)


class TextFiles:
    """Plain text files: mode 'lines' = one document per non-blank line; 'paragraphs' = documents
    separated by blank lines (a document keeps its line breaks)."""

    def __init__(self, location: str, mode: str = "lines"):
        if mode not in ("lines", "paragraphs"):
            raise UserError(f"text mode {mode!r} is not 'lines' or 'paragraphs'")
        self.paths = resolve_paths(location, _TEXT_SUFFIXES)
        self.mode = mode
        self.spec = f"text:{location}?mode={mode}"

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            with _open_text(path) as handle:
                if self.mode == "lines":
                    for line in handle:
                        if line.strip():
                            yield line.rstrip("\n")
                    continue
                paragraph: List[str] = []
                for line in handle:
                    if line.strip():
                        paragraph.append(line.rstrip("\n"))
                    elif paragraph:
                        yield "\n".join(paragraph)
                        paragraph = []
                if paragraph:
                    yield "\n".join(paragraph)


class JsonLines:
    """JSON Lines files whose objects hold the document text in `field`."""

    def __init__(self, location: str, field: str = "text"):
        self.paths = resolve_paths(location, _JSONL_SUFFIXES)
        self.field = field
        self.spec = f"jsonl:{location}?field={field}"

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            with _open_text(path) as handle:
                for line_number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise UserError(
                            f"{path}:{line_number}: not valid JSON ({error})") from None
                    text = record.get(self.field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise UserError(
                            f"{path}:{line_number}: no string field {self.field!r} (found {keys}); "
                            f"pass the name of the text field, e.g. jsonl:{path}?field=NAME or "
                            f"--text-field NAME")
                    yield text


class ParquetFiles:
    """Parquet files with the document text in string column `column` (read in record batches)."""

    def __init__(self, location: str, column: str = "text", batch_rows: int = 4096):
        self.paths = resolve_paths(location, _PARQUET_SUFFIXES)
        self.column = column
        self.batch_rows = batch_rows
        self.spec = f"parquet:{location}?column={column}"

    def __iter__(self) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError("Parquet sources need pyarrow: pip install 'mosaicbert-jax[parquet]'"
                              ) from error
        for path in self.paths:
            parquet = pq.ParquetFile(path)
            if self.column not in parquet.schema_arrow.names:
                raise UserError(f"{path} has no column {self.column!r} (columns: "
                                 f"{parquet.schema_arrow.names}); pass ?column=NAME")
            row = 0
            for batch in parquet.iter_batches(batch_size=self.batch_rows, columns=[self.column]):
                for text in batch.column(0).to_pylist():
                    if not isinstance(text, str):
                        raise UserError(f"{path} row {row}: column {self.column!r} is "
                                         f"{text!r}, not a string")
                    row += 1
                    yield text


class EmbeddedCorpus:
    """The embedded default corpus (CPython's own documentation; see corpus.py)."""

    spec = "embedded"

    def __iter__(self) -> Iterator[str]:
        from mosaicbert_jax.data.corpus import embedded_documents

        return iter(embedded_documents())


def _options(query: str, allowed: Iterable[str], spec: str) -> dict:
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - set(allowed)
    if unknown:
        raise UserError(f"source {spec!r}: unknown option(s) {sorted(unknown)}; "
                         f"allowed: {sorted(allowed)}")
    return options


def open_source(spec: str) -> Iterable[str]:
    """The document source a spec string names (see the module docstring for the forms)."""
    if spec == "embedded":
        return EmbeddedCorpus()
    kind, _, rest = spec.partition(":")
    location, _, query = rest.partition("?")
    if not location:
        raise UserError(f"source {spec!r} names no location; write KIND:LOCATION, e.g. "
                         f"jsonl:/data/docs.jsonl")
    if kind == "text":
        return TextFiles(location, **_options(query, ["mode"], spec))
    if kind == "jsonl":
        return JsonLines(location, **_options(query, ["field"], spec))
    if kind == "parquet":
        return ParquetFiles(location, **_options(query, ["column"], spec))
    if kind == "tfds":
        from mosaicbert_jax.data.tfds_source import TfdsSource

        return TfdsSource(location, **_options(query, ["split", "data_dir", "field"], spec))
    if kind == "seqio":
        from mosaicbert_jax.data.seqio_source import SeqioSource

        return SeqioSource(location, **_options(query, ["split", "field"], spec))
    if kind == "hf":
        from mosaicbert_jax.data.hf_source import HuggingFaceSource

        return HuggingFaceSource(
            location, **_options(query, ["config", "split", "field", "data_files"], spec))
    raise UserError(f"unknown source kind {kind!r} in {spec!r}; use text:, jsonl:, parquet:, "
                     f"tfds:, seqio:, hf: or embedded")
