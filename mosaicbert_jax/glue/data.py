"""GLUE examples from the official TSV layout or tensorflow-datasets, tokenized as BERT pairs.

Rows that cannot be read are never dropped quietly: they are counted, reported in the
progress output and in the results JSON. Truncation to max_seq_len is counted the same way.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from typing import Any, Optional

import numpy as np

from mosaicbert_jax.glue.tasks import GlueTask

# Official GLUE files hold very long fields (e.g. QNLI passages); raise csv's 128 KiB cap.
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))

_ENCODE_CHUNK = 8192


@dataclasses.dataclass
class RawSplit:
    """Texts (one list per text column) and labels (int class ids or float scores)."""

    texts: tuple[list[str], ...]
    labels: np.ndarray
    source: str
    skipped_rows: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass
class EncodedSplit:
    """Token ids per example ([CLS] a [SEP] (b [SEP])) with their token type ids and labels."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray
    lengths: np.ndarray
    num_truncated: int
    source: str
    skipped_rows: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def _parse_label(task: GlueTask, value: str, where: str):
    value = value.strip()
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: score {value!r} is not a number") from None
    if value in task.label_names:
        return task.label_names.index(value)
    if value.isdigit() and int(value) < task.num_labels:
        return int(value)
    raise ValueError(f"{where}: label {value!r} is not one of {task.label_names} "
                     f"or 0..{task.num_labels - 1}")


def read_glue_tsv(task: GlueTask, path: str) -> RawSplit:
    """Reads one official GLUE TSV (header row, tab separated, no quoting; CoLA headerless).

    Rows with the wrong number of columns are skipped and counted (the official QQP train
    file has a few); a label outside the task's label set is an error.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; config.data_dir must hold the GLUE TSV "
                                f"folders (e.g. {task.tsv_dir}/train.tsv), or unset it to "
                                f"read glue/{task.name} from tensorflow-datasets")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.headerless_columns is not None:
        text_index, label_index = task.headerless_columns
        columns, width, body, first_line = [text_index], None, rows, 1
    else:
        if not rows:
            raise ValueError(f"{path} is empty; expected a header row")
        header = rows[0]
        missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks columns {missing} of the GLUE "
                             f"{task.tsv_dir} layout")
        columns = [header.index(c) for c in task.text_columns]
        label_index, width, body, first_line = header.index(task.label_column), len(header), \
            rows[1:], 2
    texts: tuple[list[str], ...] = tuple([] for _ in columns)
    labels, skipped = [], 0
    needed = max(*columns, label_index) + 1
    for line_number, row in enumerate(body, start=first_line):
        if not row:  # a blank line holds no example
            continue
        if (width is not None and len(row) != width) or len(row) < needed:
            skipped += 1
            continue
        labels.append(_parse_label(task, row[label_index], f"{path}:{line_number}"))
        for text_list, column in zip(texts, columns):
            text_list.append(row[column])
    dtype = np.float32 if task.is_regression else np.int32
    return RawSplit(texts, np.asarray(labels, dtype), path, skipped)


def load_tfds_split(task: GlueTask, split: str, data_dir: Optional[str] = None) -> RawSplit:
    """Reads glue/<task> split from tensorflow-datasets (the optional `tfds` extra)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError("reading GLUE from tensorflow-datasets needs the `tfds` extra: "
                          "pip install 'mosaicbert-jax[tfds]'; or set config.data_dir to a "
                          "folder in the official GLUE TSV layout") from error
    dataset = tfds.load(f"glue/{task.name}", split=split, data_dir=data_dir,
                        shuffle_files=False)
    texts: tuple[list[str], ...] = tuple([] for _ in task.tfds_text_features)
    labels = []
    for example in tfds.as_numpy(dataset):
        for text_list, feature in zip(texts, task.tfds_text_features):
            text_list.append(example[feature].decode("utf-8"))
        labels.append(example["label"])
    dtype = np.float32 if task.is_regression else np.int32
    labels_array = np.asarray(labels, dtype)
    if not task.is_regression and labels_array.size and labels_array.min() < 0:
        raise ValueError(f"glue/{task.name} split {split!r} has unlabeled examples (label -1); "
                         f"only train and validation splits can be scored")
    return RawSplit(texts, labels_array, f"tfds:glue/{task.name}[{split}]")


def load_split(task: GlueTask, tsv_stem: str, tfds_split: str, data_dir: Optional[str],
               tfds_data_dir: Optional[str] = None) -> RawSplit:
    """From <data_dir>/<TASK>/<tsv_stem>.tsv when data_dir is set, else from TFDS."""
    if data_dir:
        return read_glue_tsv(task, os.path.join(data_dir, task.tsv_dir, f"{tsv_stem}.tsv"))
    return load_tfds_split(task, tfds_split, tfds_data_dir)


def check_tokenizer(tokenizer: Any) -> None:
    """Requires a tokenizers.Tokenizer with a post-processor that adds [CLS]/[SEP]."""
    if not hasattr(tokenizer, "encode_batch") or not hasattr(tokenizer, "to_str"):
        raise ValueError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.post_processor is None:
        raise ValueError("the tokenizer has no post-processor, so it would not add [CLS] and "
                         "[SEP]; the classifier pools the first ([CLS]) token. Use a BERT "
                         "tokenizer (mosaicbert_jax.data.tokenizer.load_tokenizer)")


def encode_split(tokenizer: Any, raw: RawSplit, max_seq_len: int) -> EncodedSplit:
    """Tokenizes single texts or pairs; longest-first truncation to max_seq_len (counted)."""
    check_tokenizer(tokenizer)
    if max_seq_len < 4:
        raise ValueError(f"max_seq_len={max_seq_len} leaves no room for text; use >= 4")
    # A private copy: truncation settings must not leak into the caller's tokenizer.
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_seq_len, strategy="longest_first")
    inputs = raw.texts[0] if len(raw.texts) == 1 else list(zip(*raw.texts))
    input_ids, type_ids, truncated = [], [], 0
    for start in range(0, len(inputs), _ENCODE_CHUNK):
        for encoding in tok.encode_batch(inputs[start:start + _ENCODE_CHUNK]):
            input_ids.append(np.asarray(encoding.ids, np.int32))
            type_ids.append(np.asarray(encoding.type_ids, np.int32))
            truncated += bool(encoding.overflowing)
    lengths = np.asarray([len(ids) for ids in input_ids], np.int32)
    return EncodedSplit(input_ids, type_ids, raw.labels, lengths, truncated, raw.source,
                        raw.skipped_rows)
