"""Build a corpus of LONG documents offline for the long-context measurements (long_context.py).

Walks the given package folders (a Python's site-packages) for .md/.rst/.txt files and module
docstrings, keeps documents of at least --min-doc-tokens tokens under the TTQ tokenizer
([CLS] doc [SEP]), drops those that overlap the TTQ training rows (more than --max-overlap of
their 16-token shingles occur in --ttq-rows), and writes `eval` [n, 1024] rows (each from one
document) and `train` [m, 512] rows (from other documents) as uint16 into one .npz.

  PYTHONPATH=. python benchmarks/make_long_rows.py --roots /work/main/.venv/lib/python3.11/site-packages \
      --out /work/main/.ttq/long_rows.npz
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import os
import re
import sys
import time

import numpy as np

PROSE_SUFFIXES = (".md", ".rst", ".txt")
MAX_FILE_BYTES = 2_000_000
CLS_ID, SEP_ID = 2, 3
SHINGLE_PRIME = np.uint64(1_000_003)
# A module docstring: optional comment/blank lines, then a (raw/unicode) triple-quoted string.
_DOCSTRING_START = re.compile(r'\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*([rRuU]?)("""|\'\'\')')


def module_docstring(source: str) -> str | None:
    """The module docstring of Python source, found without parsing the whole file."""
    match = _DOCSTRING_START.match(source)
    if not match:
        return None
    quote = match.group(2)
    end = source.find(quote, match.end())
    if end < 0:
        return None
    try:
        value = ast.literal_eval(source[match.start(1):end + 3])
    except (SyntaxError, ValueError):
        return None
    return inspect.cleandoc(value) if isinstance(value, str) else None


def iter_documents(roots: list[str], min_chars: int = 300):
    """(path, text) of every prose file and module docstring under roots, deduplicated by text."""
    seen = set()
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in sorted(names):
                path = os.path.join(folder, name)
                try:
                    if name.endswith(".py"):
                        with open(path, encoding="utf-8", errors="ignore") as f:
                            text = module_docstring(f.read())
                    elif name.endswith(PROSE_SUFFIXES) and os.path.getsize(path) < MAX_FILE_BYTES:
                        with open(path, encoding="utf-8", errors="ignore") as f:
                            text = f.read()
                    else:
                        continue
                except OSError:
                    continue
                text = (text or "").strip()
                if len(text) < min_chars:
                    continue
                digest = hashlib.md5(text.encode()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                yield path, text


def shingle_hashes(tokens: np.ndarray, width: int = 16) -> np.ndarray:
    """Polynomial hashes (uint64, wrapping) of every `width`-token window along the last axis."""
    tokens = np.asarray(tokens, np.uint64)
    count = tokens.shape[-1] - width + 1
    if count <= 0:
        return np.zeros(tokens.shape[:-1] + (0,), np.uint64)
    hashes = np.zeros(tokens.shape[:-1] + (count,), np.uint64)
    with np.errstate(over="ignore"):
        for k in range(width):
            hashes = hashes * SHINGLE_PRIME + tokens[..., k:k + count] + np.uint64(1)
    return hashes


def overlap_fraction(doc: np.ndarray, known_sorted: np.ndarray, width: int = 16) -> float:
    """Share of the document's shingles found in the sorted array of known shingle hashes."""
    hashes = shingle_hashes(doc, width)
    if hashes.size == 0 or known_sorted.size == 0:
        return 0.0
    where = np.minimum(np.searchsorted(known_sorted, hashes), known_sorted.size - 1)
    return float(np.mean(known_sorted[where] == hashes))


def cut_rows(docs: list[np.ndarray], length: int, max_per_doc: int = 0) -> np.ndarray:
    """Contiguous `length`-token rows, each inside one document (the tail that does not fill a
    row is dropped); at most max_per_doc rows a document (0: all)."""
    rows = []
    for doc in docs:
        n = len(doc) // length
        if max_per_doc:
            n = min(n, max_per_doc)
        rows.extend(doc[i * length:(i + 1) * length] for i in range(n))
    return np.stack(rows).astype(np.uint16) if rows else np.zeros((0, length), np.uint16)


def build(roots: list[str], tokenizer_path: str, ttq_rows_path: str, min_doc_tokens: int = 1024,
          max_overlap: float = 0.05, eval_len: int = 1024, train_len: int = 512,
          eval_rows: int = 256, eval_rows_per_doc: int = 4, min_train_rows: int = 30_000,
          seed: int = 0, width: int = 16) -> dict:
    """Returns {"eval", "train"} rows and the counts the script prints.

    Eval rows come only from long documents that do not overlap the TTQ rows. Train rows come
    from every other document that does not overlap the eval documents (TTQ text allowed: the
    window-loss runs train from scratch), each row inside one document; when that gives fewer
    than min_train_rows, the train documents are concatenated and rows may span documents."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(tokenizer_path)
    started = time.perf_counter()
    documents = list(iter_documents(roots))
    texts = [text for _, text in documents]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    tokenized = [np.asarray([CLS_ID] + e.ids + [SEP_ID], np.uint16) for e in encodings]
    read_s = time.perf_counter() - started

    known = np.unique(shingle_hashes(np.load(ttq_rows_path), width).ravel())
    long_index = [i for i, doc in enumerate(tokenized) if len(doc) >= min_doc_tokens]
    fractions = np.array([overlap_fraction(tokenized[i], known, width) for i in long_index])
    fresh = [i for i, f in zip(long_index, fractions) if f <= max_overlap]

    eval_index, eval_count = [], 0
    for i in np.random.default_rng(seed).permutation(fresh):
        if eval_count >= eval_rows:
            break
        if len(tokenized[i]) >= eval_len:
            eval_index.append(int(i))
            eval_count += min(len(tokenized[i]) // eval_len, eval_rows_per_doc)
    eval_docs = [tokenized[i] for i in eval_index]
    eval_known = np.unique(np.concatenate([shingle_hashes(d, width) for d in eval_docs])
                           if eval_docs else np.zeros(0, np.uint64))
    taken = set(eval_index)
    train_docs = [doc for i, doc in enumerate(tokenized) if i not in taken
                  and overlap_fraction(doc, eval_known, width) <= max_overlap]
    dropped_near_eval = len(tokenized) - len(taken) - len(train_docs)
    overlap_s = time.perf_counter() - started - read_s

    eval_set = cut_rows(eval_docs, eval_len, eval_rows_per_doc)[:eval_rows]
    train_set = cut_rows(train_docs, train_len)
    spans_documents = len(train_set) < min_train_rows
    if spans_documents:
        train_set = cut_rows([np.concatenate(train_docs)] if train_docs else [], train_len)
    train_set = train_set[np.random.default_rng(seed + 1).permutation(len(train_set))]
    return {
        "eval": eval_set, "train": train_set, "train_spans_documents": spans_documents,
        "documents": len(documents), "long_documents": len(long_index),
        "long_tokens": int(sum(len(tokenized[i]) for i in long_index)),
        "dropped_overlap": int(np.sum(fractions > max_overlap)),
        "overlap_quantiles": {q: float(np.quantile(fractions, q)) if fractions.size else 0.0
                              for q in (0.1, 0.5, 0.9)},
        "fresh_documents": len(fresh), "eval_documents": len(eval_docs),
        "train_documents": len(train_docs), "dropped_near_eval": dropped_near_eval,
        "train_tokens": int(sum(len(d) for d in train_docs)), "ttq_shingles": int(known.size),
        "read_s": read_s, "overlap_s": overlap_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", nargs="+", required=True,
                        help="folders to walk, e.g. a Python's site-packages")
    parser.add_argument("--tokenizer", default="../shared/data/ttq/rows_tokenizer.json")
    parser.add_argument("--ttq-rows", default="../shared/data/ttq/rows.npy")
    parser.add_argument("--out", default=".ttq/long_rows.npz")
    parser.add_argument("--min-doc-tokens", type=int, default=1024)
    parser.add_argument("--max-overlap", type=float, default=0.05,
                        help="drop a document when more than this share of its 16-token "
                             "shingles occur in the TTQ rows")
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--eval-rows-per-doc", type=int, default=4)
    parser.add_argument("--min-train-rows", type=int, default=30_000,
                        help="below this many in-document train rows, rows may span documents")
    args = parser.parse_args(argv)
    for path, flag in ((args.tokenizer, "--tokenizer"), (args.ttq_rows, "--ttq-rows")):
        if not os.path.isfile(path):
            sys.exit(f"error: {flag} {path} not found; pass {flag} (see ../shared/data/ttq)")
    for root in args.roots:
        if not os.path.isdir(root):
            sys.exit(f"error: --roots {root} is not a folder; pass a site-packages folder")
    result = build(args.roots, args.tokenizer, args.ttq_rows, args.min_doc_tokens,
                   args.max_overlap, eval_rows=args.eval_rows,
                   eval_rows_per_doc=args.eval_rows_per_doc,
                   min_train_rows=args.min_train_rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, eval=result["eval"], train=result["train"],
             train_spans_documents=np.asarray(result["train_spans_documents"]))
    q = result["overlap_quantiles"]
    print(f"{result['documents']} documents, {result['long_documents']} with >= "
          f"{args.min_doc_tokens} tokens ({result['long_tokens']:,} tokens); "
          f"{result['dropped_overlap']} dropped as overlapping the TTQ rows (> "
          f"{args.max_overlap:.0%} of 16-token shingles; overlap p10/p50/p90 "
          f"{q[0.1]:.1%}/{q[0.5]:.1%}/{q[0.9]:.1%}), {result['fresh_documents']} kept")
    print(f"eval: {len(result['eval'])} rows x {result['eval'].shape[1]} from "
          f"{result['eval_documents']} documents; train: {len(result['train'])} rows x "
          f"{result['train'].shape[1]} from {result['train_documents']} documents "
          f"({result['train_tokens']:,} tokens; {result['dropped_near_eval']} dropped as "
          f"overlapping the eval documents), rows "
          + ("SPAN documents (too few in-document rows)" if result["train_spans_documents"]
             else "each inside one document"))
    print(f"read+tokenize {result['read_s']:.0f} s, overlap {result['overlap_s']:.0f} s; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
