"""prepare: tokenize a corpus once into sharded, memory-mapped token files (resumable).

    python -m mosaicbert_jax.data.prepare --out DIR --train SOURCE [--eval SOURCE |
        --eval-fraction F] (--tokenizer PATH_OR_NAME | --train-tokenizer VOCAB_SIZE)

SOURCE is a spec such as jsonl:/data/c4/*.json.gz or tfds:c4/en?split=train (see sources.py).
The source is read in order and cut into shards of --shard-documents documents; shard i always
holds the same documents. The shards dir is built in a hidden sibling directory (.NAME.partial)
and renamed to --out when complete, so a failed run leaves nothing in --out; a rerun of the same
command (after an error, Ctrl-C or kill -9) skips the shards already written and finishes the
rest. Tokenization runs on all cores (the tokenizers library's parallel encode_batch),
overlapped with reading the source and writing shards.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import itertools
import json
import os
import queue
import shutil
import sys
import threading
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tokenizers import Tokenizer

from mosaicbert_jax.cli_errors import UserError, as_user_error, run_main
from mosaicbert_jax.data import shards as shards_lib
from mosaicbert_jax.data.sources import open_source
from mosaicbert_jax.data.tokenizer import (SpecialTokens, load_tokenizer, padded_vocab_size,
                                           tokenizer_vocab_size, train_wordpiece)

PREPARE_FILE = shards_lib.PREPARE_FILE
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def holdout_mask(first_index: int, count: int, fraction: float) -> np.ndarray:
    """Which of source documents first_index .. first_index + count - 1 go to the eval split.

    A fixed, well-spread function of the document's position in the source (Weyl sequence), so
    the split never depends on shard size, batch size or reruns.
    """
    if fraction <= 0.0:
        return np.zeros(count, bool)
    index = np.arange(first_index, first_index + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        spread = (index + np.uint64(1)) * _GOLDEN
    return (spread >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < fraction


class _Progress:
    """A one-line progress report on stderr (documents, tokens, shards, rate)."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.documents = self.tokens = self.shards_written = self.shards_skipped = 0
        self.started = self.last_print = time.monotonic()

    def update(self, documents: int = 0, tokens: int = 0, written: int = 0, skipped: int = 0):
        self.documents += documents
        self.tokens += tokens
        self.shards_written += written
        self.shards_skipped += skipped
        if self.enabled and time.monotonic() - self.last_print > 0.5:
            self._print("\r")

    def _print(self, end: str) -> None:
        self.last_print = time.monotonic()
        rate = self.tokens / max(self.last_print - self.started, 1e-9)
        sys.stderr.write(f"\r{self.label}: {self.documents:,} docs, {self.tokens:,} tokens, "
                         f"{self.shards_written} shards written, {self.shards_skipped} skipped "
                         f"(done before), {rate / 1e6:.2f}M tokens/s{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._print("\n")


def _read_in_chunks(source: Iterable[str], shard_documents: int, chunk_documents: int,
                    completed: set, chunks: "queue.Queue", stop: threading.Event) -> None:
    """Reader thread: puts (shard, first_index, documents) on `chunks`, chunks never crossing a
    shard boundary; a shard finished by an earlier run is read past and sent as its count."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        iterator = iter(source)
        position = 0
        while True:
            shard, offset = divmod(position, shard_documents)
            if shard in completed:
                count = sum(1 for _ in itertools.islice(iterator, shard_documents - offset))
                item, wanted = (shard, position, count), shard_documents - offset
            else:
                wanted = min(chunk_documents, shard_documents - offset)
                documents = list(itertools.islice(iterator, wanted))
                count, item = len(documents), (shard, position, documents)
            if count == 0 or not put(item):
                break
            position += count
            if count < wanted:
                break
        put(None)
    except BaseException as error:  # raised again by the main thread
        put(error)


def _chunks(source: Iterable[str], shard_documents: int, chunk_documents: int,
            completed: set) -> Iterator[Tuple[int, int, object]]:
    chunks: "queue.Queue" = queue.Queue(maxsize=16)
    stop = threading.Event()
    reader = threading.Thread(
        target=_read_in_chunks, daemon=True,
        args=(source, shard_documents, chunk_documents, completed, chunks, stop))
    reader.start()
    try:
        while True:
            item = chunks.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # lets the reader end if the consumer stops early


class _ShardBuffer:
    """Token arrays of the shard being tokenized, per split, until the shard is complete."""

    def __init__(self, splits: Sequence[str]):
        self.tokens: Dict[str, List[np.ndarray]] = {s: [] for s in splits}
        self.lengths: Dict[str, List[np.ndarray]] = {s: [] for s in splits}

    def add(self, split: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens[split].append(tokens)
        self.lengths[split].append(lengths)

    def write(self, out_dir: str, shard: int, dtype: np.dtype) -> Dict[str, dict]:
        markers = {}
        for split in self.tokens:
            tokens = np.concatenate(self.tokens[split] or [np.zeros(0, dtype)])
            lengths = np.concatenate(self.lengths[split] or [np.zeros(0, np.int64)])
            markers[split] = shards_lib.write_shard(out_dir, split, shard, tokens, lengths)
        return markers


def _to_arrays(encodings, dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    ids = [encoding.ids for encoding in encodings]
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
    return tokens, lengths


def _encoded(tokenizer: Tokenizer, chunks: Iterable[tuple], dtype: np.dtype) -> Iterator[tuple]:
    """(shard, first_index, count, (tokens, lengths) or None for a skipped shard), in order.

    Chunk k + 1 is encoded (parallel, outside the GIL) while chunk k is converted to arrays.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as encoder:
        pending: collections.deque = collections.deque()
        for shard, first, documents in chunks:
            if isinstance(documents, int):
                pending.append((shard, first, documents, None))
            else:
                pending.append((shard, first, len(documents), encoder.submit(
                    tokenizer.encode_batch_fast, documents, add_special_tokens=False)))
            while len(pending) > 1 or (pending and pending[0][3] is None):
                yield _resolve(pending.popleft(), dtype)
        while pending:
            yield _resolve(pending.popleft(), dtype)


def _resolve(item: tuple, dtype: np.dtype) -> tuple:
    shard, first, count, future = item
    return shard, first, count, None if future is None else _to_arrays(future.result(), dtype)


def _completed_shards(out_dir: str, splits: Sequence[str]) -> Dict[int, Dict[str, dict]]:
    """Markers of the leading shards that an earlier run finished for every split."""
    completed = {}
    for shard in itertools.count():
        found = {s: shards_lib.completed_shard(out_dir, s, shard) for s in splits}
        if not all(found.values()):
            return completed
        completed[shard] = found


def _tokenize_source(out_dir: str, tokenizer: Tokenizer, source: Iterable[str],
                     splits: Tuple[str, ...], eval_fraction: float, shard_documents: int,
                     chunk_documents: int, progress: _Progress
                     ) -> Tuple[Dict[str, List[dict]], int]:
    """Writes every shard of one source into `splits` (("train",), ("eval",) or both, split by
    `holdout_mask`); returns the shard markers per split and the number of documents dropped
    because they have no tokens (empty or whitespace-only)."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    vocab_size = tokenizer_vocab_size(tokenizer)
    dtype = shards_lib.token_dtype(vocab_size)
    forbidden = np.zeros(padded_vocab_size(vocab_size), bool)
    forbidden[[special.pad, special.cls, special.sep, special.mask]] = True
    completed = _completed_shards(out_dir, splits)
    markers: Dict[str, Dict[int, dict]] = {
        s: {shard: found[s] for shard, found in completed.items()} for s in splits}
    empty = 0
    buffer: Optional[_ShardBuffer] = None
    current = -1

    def flush() -> None:
        if buffer is not None:
            for split, marker in buffer.write(out_dir, current, dtype).items():
                markers[split][current] = marker
            progress.update(written=1)

    chunks = _chunks(source, shard_documents, chunk_documents, set(completed))
    for shard, first, count, arrays in _encoded(tokenizer, chunks, dtype):
        if arrays is None:
            progress.update(documents=count, skipped=1)
            continue
        if shard != current:
            flush()
            buffer, current = _ShardBuffer(splits), shard
        tokens, lengths = arrays
        if forbidden[tokens].any():
            raise UserError("the tokenizer produced [PAD]/[CLS]/[SEP]/[MASK] ids inside a "
                             "document; it must split special-token strings found in text")
        keep = lengths > 0
        empty += int(count - keep.sum())
        in_eval = holdout_mask(first, count, eval_fraction) if len(splits) == 2 else \
            np.full(count, splits == ("eval",))
        for split, chosen in (("train", keep & ~in_eval), ("eval", keep & in_eval)):
            if split in splits and chosen.any():
                buffer.add(split, tokens[np.repeat(chosen, lengths)], lengths[chosen])
        progress.update(documents=count, tokens=len(tokens))
    flush()
    return {s: [markers[s][i] for i in sorted(markers[s])] for s in splits}, empty


def _tokenizer_for_documents(tokenizer: Tokenizer) -> Tokenizer:
    """A copy that encodes text like "[MASK]" as ordinary words, never as special ids, and
    neither truncates nor pads."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    copy.no_truncation()
    copy.no_padding()
    return copy


def _read_identity(shards_dir: str) -> Optional[dict]:
    path = os.path.join(shards_dir, PREPARE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except ValueError:  # cut short by a kill during the first write: treat as unknown
        return {}


def _differences(previous: dict, identity: dict, only_known: bool = False) -> List[str]:
    """Keys whose values differ; with `only_known`, keys absent from `previous` (a dir from an
    older version) are not counted."""
    return sorted(k for k in identity
                  if previous.get(k) != identity[k] and not (only_known and k not in previous))


def _start_or_resume(partial: str, identity: dict, progress: bool) -> None:
    """Makes `partial` the build dir of this preparation: resumed when an earlier run of the same
    command left it, started afresh (the stale one removed) when it is from another command."""
    previous = _read_identity(partial)
    if previous is not None and previous != identity:
        if progress:
            print(f"prepare: discarding the unfinished preparation in {partial} (made by a "
                  f"different command: differs in {_differences(previous, identity)})",
                  file=sys.stderr)
        shutil.rmtree(partial)
    elif previous is None and os.path.isdir(partial):
        shutil.rmtree(partial)  # killed before it recorded what it was
    if not os.path.isdir(partial):
        os.makedirs(partial + ".new", exist_ok=True)
        with open(os.path.join(partial + ".new", PREPARE_FILE), "w") as handle:
            json.dump(identity, handle, indent=1, sort_keys=True)
        os.replace(partial + ".new", partial)


def _finished_shards(partial: str) -> int:
    return sum(name.endswith(".json") for split in ("train", "eval")
               for name in (os.listdir(os.path.join(partial, split))
                            if os.path.isdir(os.path.join(partial, split)) else []))


def _check_out_dir(out_dir: str, partial: str) -> None:
    """Refuses an --out that exists and holds something else; moves an unfinished preparation
    made in place by an older version to the partial dir, where it resumes."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise UserError(f"--out {out_dir} is a file; give a directory path")
        return
    names = sorted(os.listdir(out_dir))
    if not names:
        return
    if PREPARE_FILE in names and not os.path.exists(partial):
        os.rename(out_dir, partial)
        return
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise UserError(f"--out {out_dir} exists and is not a prepared shards dir (it holds {shown}); "
                    f"give a new --out directory (prepare creates it)")


def prepare(out_dir: str, tokenizer: Tokenizer, train: Iterable[str],
            eval: Optional[Iterable[str]] = None, eval_fraction: float = 0.0,
            shard_documents: int = 100_000, chunk_documents: int = 1_000,
            progress: bool = True, tokenizer_origin: Optional[dict] = None) -> dict:
    """Tokenizes `train` (and `eval`, or an `eval_fraction` held out of `train`) into a shards
    dir; returns its metadata. A finished `out_dir` made the same way is reused.

    The shards are written to `shards.partial_dir(out_dir)` and that dir is renamed to `out_dir`
    when complete. A failed run leaves nothing in `out_dir`; the same call again resumes from
    the shards finished so far (a run that finished none leaves nothing at all), and a different
    call starts afresh. Documents are stored without [CLS]/[SEP] (packing adds them); documents
    without any token are dropped and counted in the metadata as `empty_documents_skipped`.
    `tokenizer_origin` records how the tokenizer was made (e.g. trained on the corpus).
    """
    if eval is not None and eval_fraction > 0:
        raise UserError("give either an eval source or eval_fraction > 0, not both")
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    if shard_documents < 1 or chunk_documents < 1:
        raise UserError("shard_documents and chunk_documents must be positive")
    special = SpecialTokens.from_tokenizer(tokenizer)
    serialized = tokenizer.to_str()
    identity = {"format": shards_lib.FORMAT, "version": shards_lib.VERSION,
                "tokenizer_sha256": hashlib.sha256(serialized.encode()).hexdigest(),
                "train": getattr(train, "spec", "iterable"),
                "eval": None if eval is None else getattr(eval, "spec", "iterable"),
                "eval_fraction": eval_fraction, "shard_documents": shard_documents,
                "tokenizer_origin": tokenizer_origin}
    if os.path.exists(os.path.join(out_dir, shards_lib.META_FILE)):
        changed = _differences(_read_identity(out_dir) or {}, identity, only_known=True)
        if changed:
            raise UserError(f"{out_dir} holds a different preparation (differs in {changed}); "
                            f"use a new --out directory, or delete this one to start over")
        return shards_lib.read_metadata(out_dir)
    partial = shards_lib.partial_dir(out_dir)
    _check_out_dir(out_dir, partial)
    _start_or_resume(partial, identity, progress)
    try:
        meta = _prepare_into(partial, tokenizer, special, train, eval, eval_fraction,
                             shard_documents, chunk_documents, progress, identity)
    except BaseException as error:
        finished = _finished_shards(partial)
        if not finished:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, UserError):
            kept = ("nothing was written, so the corrected command starts afresh" if not finished
                    else f"the {finished} shard(s) finished so far are kept in {partial}: the "
                         f"same command resumes there, a different one (or `rm -r {partial}`) "
                         f"starts over")
            raise UserError(f"{error} ({kept})") from error
        raise
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above); rename onto it is not portable
    os.rename(partial, os.path.abspath(out_dir))
    return meta


def _prepare_into(build_dir: str, tokenizer: Tokenizer, special: SpecialTokens,
                  train: Iterable[str], eval: Optional[Iterable[str]], eval_fraction: float,
                  shard_documents: int, chunk_documents: int, progress: bool,
                  identity: dict) -> dict:
    """Writes (or finishes) every shard and the metadata into `build_dir`."""
    tokenizer.save(os.path.join(build_dir, shards_lib.TOKENIZER_FILE))
    encoder = _tokenizer_for_documents(tokenizer)
    jobs = [("train", train, ("train", "eval") if eval_fraction > 0 else ("train",))]
    if eval is not None:
        jobs.append(("eval", eval, ("eval",)))
    split_markers: Dict[str, List[dict]] = {}
    empty_documents = 0
    for label, source, splits in jobs:
        report = _Progress(f"prepare {label}", progress)
        try:
            markers, empty = _tokenize_source(build_dir, encoder, source, splits, eval_fraction,
                                              shard_documents, chunk_documents, report)
        finally:
            report.close()  # ends the progress line, so an error message starts a line
        if not any(m["num_documents"] for ms in markers.values() for m in ms):
            raise UserError(f"{label} corpus {getattr(source, 'spec', source)!r} has no "
                            f"documents (empty files?); give a corpus with text in it")
        for split, shard_list in markers.items():
            split_markers.setdefault(split, []).extend(shard_list)
        empty_documents += empty
    return shards_lib.write_metadata(
        build_dir, tokenizer_vocab_size(tokenizer), special, split_markers,
        tokenizer_file=shards_lib.TOKENIZER_FILE,
        extra={"sources": {"train": identity["train"], "eval": identity["eval"]},
               "eval_fraction": eval_fraction, "shard_documents": shard_documents,
               "empty_documents_skipped": empty_documents})


def _with_text_field(spec: str, name: Optional[str]) -> str:
    if not name:
        return spec
    option = "column" if spec.startswith("parquet:") else "field"
    return f"{spec}{'&' if '?' in spec else '?'}{option}={name}"


def _training_texts(source: Iterable[str], limit: int, eval_fraction: float) -> Iterator[str]:
    """The first `limit` documents of `source` that are not held out for eval."""
    held_out = holdout_mask(0, limit, eval_fraction)
    for index, text in enumerate(itertools.islice(source, limit)):
        if not held_out[index]:
            yield text


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mosaicbert_jax.data.prepare", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="shards directory to write (or resume)")
    parser.add_argument("--train", required=True, help="training corpus spec, e.g. "
                        "jsonl:/data/*.jsonl, text:/data/books.txt?mode=paragraphs, "
                        "tfds:c4/en?split=train, embedded")
    parser.add_argument("--eval", help="evaluation corpus spec, e.g. tfds:c4/en?split=validation")
    parser.add_argument("--eval-fraction", type=float, default=0.0,
                        help="hold out this share of the train corpus as the eval split")
    parser.add_argument("--text-field", help="JSON field / Parquet column / feature with the text")
    tokenizer_group = parser.add_mutually_exclusive_group(required=True)
    tokenizer_group.add_argument("--tokenizer", help="tokenizer.json, vocab.txt, a directory "
                                 "holding one, or a hub name such as bert-base-uncased")
    tokenizer_group.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                                 help="train a WordPiece vocabulary of this size on the corpus")
    parser.add_argument("--tokenizer-documents", type=int, default=300_000,
                        help="documents (held in memory) to train the vocabulary on "
                             "(default 300,000)")
    parser.add_argument("--shard-documents", type=int, default=100_000)
    parser.add_argument("--chunk-documents", type=int, default=1_000,
                        help="documents per encode_batch call")
    parser.add_argument("--threads", type=int, help="tokenizer threads (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    train = open_source(_with_text_field(args.train, args.text_field))
    evaluation = open_source(_with_text_field(args.eval, args.text_field)) if args.eval else None
    origin = None if args.tokenizer else {"train_wordpiece": args.train_tokenizer,
                                          "documents": args.tokenizer_documents}
    if args.tokenizer:
        with as_user_error(ValueError, OSError):
            tokenizer = load_tokenizer(args.tokenizer)
    else:
        saved = _reusable_trained_tokenizer(args.out, origin, train, args.eval_fraction)
        if saved:  # finished or resuming: the vocabulary trained by the first run
            tokenizer = load_tokenizer(saved)
        else:
            if not args.quiet:
                print(f"training a WordPiece vocabulary of {args.train_tokenizer} on up to "
                      f"{args.tokenizer_documents:,} documents", file=sys.stderr)
            with as_user_error(ValueError):  # e.g. a vocabulary size too small
                tokenizer = train_wordpiece(
                    _training_texts(train, args.tokenizer_documents, args.eval_fraction),
                    args.train_tokenizer)
    meta = prepare(args.out, tokenizer, train, evaluation, args.eval_fraction,
                   args.shard_documents, args.chunk_documents, progress=not args.quiet,
                   tokenizer_origin=origin)
    summary = {split: {k: info[k] for k in ("num_documents", "num_tokens")}
               | {"shards": len(info["shards"])} for split, info in meta["splits"].items()}
    print(json.dumps({"out": args.out, "vocab_size": meta["vocab_size"],
                      "padded_vocab_size": meta["padded_vocab_size"], "splits": summary}))


def _reusable_trained_tokenizer(out_dir: str, origin: dict, train: Iterable[str],
                                eval_fraction: float) -> Optional[str]:
    """The tokenizer.json that an earlier run of the same command trained (in the finished
    `out_dir` or in its partial dir), or None when there is none to reuse."""
    for directory in (out_dir, shards_lib.partial_dir(out_dir)):
        previous = _read_identity(directory) or {}
        path = os.path.join(directory, shards_lib.TOKENIZER_FILE)
        same = (previous.get("tokenizer_origin", origin) == origin
                and previous.get("train") == getattr(train, "spec", "iterable")
                and previous.get("eval_fraction") == eval_fraction)
        if same and os.path.exists(path):
            return path
    return None


if __name__ == "__main__":
    run_main(main)
