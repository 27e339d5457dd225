"""prepare_embedded: the offline default dataset, ready to train on in a few seconds.

Trains a WordPiece vocabulary on the embedded corpus (CPython's documentation, see corpus.py),
tokenizes it and writes shards with a held-out eval split into a cache directory. The result is
cached under a name that records the Python version and settings; later calls reuse it, and
concurrent callers are safe (each builds in a private directory, the first rename wins).
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from typing import Optional

from mosaicbert_jax.data import shards as shards_lib
from mosaicbert_jax.data.corpus import embedded_documents
from mosaicbert_jax.data.prepare import holdout_mask, prepare
from mosaicbert_jax.data.sources import DocumentList
from mosaicbert_jax.data.tokenizer import train_wordpiece

EMBEDDED_VERSION = 1


def _is_complete(shards_dir: str) -> bool:
    try:
        return bool(shards_lib.read_metadata(shards_dir).get("complete"))
    except ValueError:
        return False


def prepare_embedded(cache_dir: str, vocab_size: int = 8192, seq_len: Optional[int] = None,
                     eval_fraction: float = 0.05) -> str:
    """Builds (or reuses) the embedded corpus's shards under `cache_dir`; returns the shards dir.

    The shards do not depend on `seq_len` (packing happens when batches are read), so one cache
    serves every sequence length; `seq_len` is only checked to be usable (>= 8).
    """
    if seq_len is not None and seq_len < 8:
        raise ValueError(f"seq_len={seq_len} is too short; use at least 8")
    name = (f"embedded-v{EMBEDDED_VERSION}-py{platform.python_version()}-vocab{vocab_size}"
            f"-eval{eval_fraction:g}")
    shards_dir = os.path.join(os.path.expanduser(cache_dir), name)
    if _is_complete(shards_dir):
        return shards_dir
    os.makedirs(os.path.dirname(shards_dir), exist_ok=True)
    building = tempfile.mkdtemp(prefix=name + ".building-", dir=os.path.dirname(shards_dir))
    os.chmod(building, 0o755)  # a shared cache: readable by everyone, like any other dir
    try:
        documents = embedded_documents()
        held_out = holdout_mask(0, len(documents), eval_fraction)
        tokenizer = train_wordpiece((d for d, h in zip(documents, held_out) if not h), vocab_size)
        prepare(building, tokenizer, DocumentList(documents, spec="embedded"),
                eval_fraction=eval_fraction, progress=False)
        try:
            os.rename(building, shards_dir)
        except OSError:  # another process finished first (or a stale partial dir is in the way)
            if not _is_complete(shards_dir):
                shutil.rmtree(shards_dir, ignore_errors=True)
                os.rename(building, shards_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return shards_dir
