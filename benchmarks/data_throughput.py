"""Data pipeline throughput: packed + masked MLM tokens per second on ONE CPU core.

    python benchmarks/data_throughput.py [--tokens 20000000] [--seconds 5] [--shards DIR]
                                         [--prepare]

Reads prepared shards (by default a synthetic corpus with C4-like, long-tailed document lengths,
written to a temporary directory first), pins the process to one core and times MLMBatches.
Prints a table of tokens/s (all slots of the batches, and real non-padding tokens), packing
fill, and masking statistics. --prepare also times `prepare` (all cores) on the embedded corpus.
Target: >= 2M tokens/s per core.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from mosaicbert_jax.data import MLMBatches, read_metadata
from mosaicbert_jax.data.synthetic import write_synthetic_shards


def pin_to_one_core() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def time_batches(shards_dir: str, batch_size: int, seq_len: int, seconds: float) -> dict:
    it = MLMBatches(shards_dir, "train", batch_size, seq_len)
    for _ in range(3):  # warm up: page cache, first epoch layout
        next(it)
    batches, real = 0, 0
    start, start_cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        batches += 1
        real += int(np.count_nonzero(batch["segment_ids"]))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    slots = batches * batch_size * seq_len
    return {"tokens_per_s": slots / elapsed, "tokens_per_cpu_s": slots / cpu,
            "real_tokens_per_s": real / elapsed, "ms_per_batch": 1e3 * elapsed / batches,
            "fill": real / slots}


def masking_stats(shards_dir: str, batch_size: int, seq_len: int, num_tokens: int,
                  special_ids: dict) -> dict:
    it = MLMBatches(shards_dir, "train", batch_size, seq_len)
    special = np.array(list(special_ids.values()))
    maskable = selected = as_mask = changed = 0
    for _ in range(max(1, num_tokens // (batch_size * seq_len))):
        batch = next(it)
        rows, slots = np.nonzero(batch["masked_weights"])
        positions = batch["masked_positions"][rows, slots]
        labels = batch["masked_labels"][rows, slots]
        original = batch["input_ids"].copy()
        original[rows, positions] = labels
        maskable += int(np.count_nonzero(~np.isin(original, special)))
        now = batch["input_ids"][rows, positions]
        selected += len(rows)
        as_mask += int(np.count_nonzero(now == special_ids["mask"]))
        changed += int(np.count_nonzero((now != labels) & (now != special_ids["mask"])))
    return {"selected": selected / maskable, "mask": as_mask / selected,
            "random": changed / selected, "unchanged": 1 - (as_mask + changed) / selected,
            "maskable_tokens": maskable}


def epoch_fill(shards_dir: str, batch_size: int, seq_len: int) -> float:
    """Real tokens / all tokens over one whole epoch (repeat=False), all-padding rows excluded."""
    real = total = 0
    for batch in MLMBatches(shards_dir, "train", batch_size, seq_len, repeat=False):
        rows = batch["segment_ids"][(batch["segment_ids"] > 0).any(axis=1)]
        real += int(np.count_nonzero(rows))
        total += rows.size
    return real / total


def time_prepare(cache_dir: str) -> str:
    from mosaicbert_jax.data.corpus import embedded_documents
    from mosaicbert_jax.data.prepare import prepare
    from mosaicbert_jax.data.sources import DocumentList
    from mosaicbert_jax.data.tokenizer import train_wordpiece

    documents = embedded_documents()
    tokenizer = train_wordpiece(documents, 8192)
    start = time.perf_counter()
    meta = prepare(os.path.join(cache_dir, "prepared"), tokenizer, DocumentList(documents),
                   progress=False)
    elapsed = time.perf_counter() - start
    tokens = meta["splits"]["train"]["num_tokens"]
    return (f"prepare (embedded corpus, {os.cpu_count()} cores): {tokens:,} tokens in "
            f"{elapsed:.2f} s = {tokens / elapsed / 1e6:.2f}M tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000_000, help="synthetic corpus size")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per configuration")
    parser.add_argument("--shards", help="time an existing prepared shards dir instead")
    parser.add_argument("--prepare", action="store_true", help="also time prepare (all cores)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        prepare_line = time_prepare(scratch) if args.prepare else None
        shards_dir = args.shards
        if shards_dir is None:
            shards_dir = os.path.join(scratch, "synthetic")
            write_synthetic_shards(shards_dir, args.tokens, vocab_size=30522,
                                   shard_documents=20_000)
        meta = read_metadata(shards_dir)
        pinned = pin_to_one_core()
        train = meta["splits"]["train"]
        print(f"# data throughput, {platform.processor() or platform.machine()}, {pinned}, "
              f"numpy {np.__version__}, {time.strftime('%Y-%m-%d')}")
        print(f"corpus: {shards_dir if args.shards else 'synthetic, C4-like lengths'}: "
              f"{train['num_documents']:,} documents, {train['num_tokens']:,} tokens, "
              f"vocab {meta['vocab_size']}")
        print(f"load average before timing: {os.getloadavg()[0]:.2f} "
              f"(tokens per CPU-second is robust to other load on the core)")
        print("\n| batch x seq_len | tokens/s (1 core) | tokens/CPU-s | real tokens/s | ms/batch "
              "| fill | epoch fill | selected | [MASK] / random / unchanged |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for batch_size, seq_len in ((256, 128), (64, 512), (32, 1024)):
            speed = time_batches(shards_dir, batch_size, seq_len, args.seconds)
            stats = masking_stats(shards_dir, batch_size, seq_len, 1_000_000, meta["special_ids"])
            fill = epoch_fill(shards_dir, batch_size, seq_len)
            print(f"| {batch_size} x {seq_len} | {speed['tokens_per_s'] / 1e6:.2f}M "
                  f"| {speed['tokens_per_cpu_s'] / 1e6:.2f}M "
                  f"| {speed['real_tokens_per_s'] / 1e6:.2f}M | {speed['ms_per_batch']:.2f} "
                  f"| {speed['fill']:.3%} | {fill:.3%} | {stats['selected']:.3%} "
                  f"| {stats['mask']:.2%} / {stats['random']:.2%} / {stats['unchanged']:.2%} |")
        if prepare_line:
            print("\n" + prepare_line)


if __name__ == "__main__":
    main()
