"""MLMBatches: packed, masked, static-shape MLM batches from prepared shards, resumable exactly."""

from __future__ import annotations

from typing import Dict

import numpy as np

from mosaicbert_jax.data.masking import MaskingTables, mask_rows, max_predictions_for
from mosaicbert_jax.data.packing import DocumentStream, assemble_rows
from mosaicbert_jax.data.shards import open_split, read_metadata
from mosaicbert_jax.data.tokenizer import SpecialTokens

STATE_FORMAT = "mosaicbert-jax-mlm-batches"
_MASKING_STREAM = 3
STATE_VERSION = 2
# Settings a saved position depends on. The process count and index are not among them: every
# process derives its own rows from the global batch index, so another count can resume.
_STATE_KEYS = ("split", "global_batch_size", "seq_len", "mask_prob", "max_predictions", "seed",
               "repeat", "split_documents", "split_tokens")


class MLMBatches:
    """Iterator of packed, masked MLM batches (dicts of numpy arrays) from a prepared shards dir.

    Each batch holds `batch_size` rows of `seq_len` tokens for this process:
      input_ids        int32 [B, S]  masked token ids, 0 = padding
      segment_ids      int32 [B, S]  0 = padding, 1..n = the [CLS] ... [SEP] segments of the row
      masked_positions int32 [B, K]  selected positions, ascending; empty slots hold 0
      masked_weights   float32 [B, K] 1.0 for a selected slot, 0.0 for an empty one
      masked_labels    int32 [B, K]  original token of each selected slot, 0 in empty slots
    with K = `max_predictions` (default ceil(mask_prob * (seq_len - 2)), enough for every row).

    Documents are shuffled per epoch (seeded) and packed back to back; a document that does not
    fit the rest of a row continues in the next row as a new [CLS] ... [SEP] segment, so nothing
    is dropped and rows are >99% full. All processes cut rows from the same stream: global batch n
    is rows [n * G, (n + 1) * G) of it (G = batch_size * process_count) and process p takes rows
    p * batch_size onwards of those, so the processes' rows are disjoint, together cover the
    split, and the tokens of global batch n do not depend on the process count.

    With repeat=True epochs follow each other forever. With repeat=False iteration stops after
    one epoch: the last batch is completed with all-padding rows (nothing is dropped), and every
    process yields the same number of batches (`batches_per_epoch`), so hosts stay in step.

    Randomness is counter-based: batch n is a pure function of (seed, process_index,
    process_count, n), so `get_state()` (a small JSON-able dict, the same on every process) and
    `set_state()` resume exactly. A state resumes on another process count too (same tokens per
    global batch; the masks then differ from the uninterrupted run's).
    """

    def __init__(self, shards_dir: str, split: str, batch_size: int, seq_len: int,
                 mask_prob: float = 0.3, seed: int = 17, process_index: int = 0,
                 process_count: int = 1, repeat: bool = True, max_predictions: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if seq_len < 8:
            raise ValueError(f"seq_len={seq_len} is too short; use at least 8")
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob={mask_prob} must be in (0, 1]; 0.3 for training, 0.15 "
                             f"for evaluation")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count="
                             f"{process_count})")
        needed = max_predictions_for(seq_len, mask_prob)
        if max_predictions is not None and max_predictions < needed:
            raise ValueError(f"max_predictions={max_predictions} is too small: rows of seq_len "
                             f"{seq_len} at mask_prob {mask_prob} select up to {needed} tokens; "
                             f"pass max_predictions >= {needed} or None")
        meta = read_metadata(shards_dir)
        self.shards_dir, self.split = shards_dir, split
        self.batch_size, self.seq_len, self.mask_prob = batch_size, seq_len, mask_prob
        self.seed, self.repeat = int(seed), bool(repeat)
        self.process_index, self.process_count = process_index, process_count
        self.max_predictions = needed if max_predictions is None else int(max_predictions)
        self.special = SpecialTokens.from_dict(meta["special_ids"])
        self.special_ids = self.special.as_dict()
        self.vocab_size = int(meta["padded_vocab_size"])
        self.tokenizer_vocab_size = int(meta["vocab_size"])
        shards = open_split(shards_dir, split, meta)
        self.global_batch_size = batch_size * process_count
        self._stream = DocumentStream(shards, self.special, seed)  # the one stream of the split
        if self._stream.num_documents == 0:
            raise ValueError(f"split {split!r} of {shards_dir} has no documents")
        self._tables = MaskingTables(self.tokenizer_vocab_size, self.vocab_size, self.special)
        self._split_counts = (meta["splits"][split]["num_documents"],
                              meta["splits"][split]["num_tokens"])
        self._row_width = seq_len - 2
        rows = -(-self._stream.epoch_length // self._row_width)
        self.batches_per_epoch = -(-rows // self.global_batch_size)  # the same on every process
        self._batch_index = 0

    @property
    def num_documents(self) -> int:
        """Documents of the split (all processes read from all of them)."""
        return self._stream.num_documents

    @property
    def num_tokens(self) -> int:
        """Tokens (without [CLS]/[SEP]) of the split."""
        return self._stream.num_tokens

    @property
    def epoch(self) -> int:
        """The epoch the next global batch starts in."""
        return self._global_position(self._batch_index) // self._stream.epoch_length

    def _global_position(self, batch_index: int) -> int:
        """Stream offset where global batch `batch_index` starts."""
        return batch_index * self.global_batch_size * self._row_width

    def _position(self, batch_index: int) -> int:
        """Stream offset of this process's first row of global batch `batch_index`."""
        first_row = batch_index * self.global_batch_size + self.process_index * self.batch_size
        return first_row * self._row_width

    def __iter__(self) -> "MLMBatches":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if not self.repeat and self._batch_index >= self.batches_per_epoch:
            raise StopIteration
        batch = self.batch_at(self._batch_index)
        self._batch_index += 1
        return batch

    def batch_at(self, batch_index: int) -> Dict[str, np.ndarray]:
        """Batch number `batch_index` of the stream (what the iterator yields at that step)."""
        stream = self._stream.read(self._position(batch_index),
                                   self.batch_size * self._row_width, self.repeat)
        input_ids, segment_ids = assemble_rows(stream, self.batch_size, self.seq_len, self.special)
        rng = np.random.default_rng([self.seed, self.process_index, _MASKING_STREAM, batch_index])
        batch = mask_rows(input_ids, rng, self.mask_prob, self.max_predictions, self._tables)
        batch["segment_ids"] = segment_ids
        return batch

    def _config(self) -> dict:
        return {"split": self.split, "global_batch_size": self.global_batch_size,
                "seq_len": self.seq_len, "mask_prob": self.mask_prob,
                "max_predictions": self.max_predictions, "seed": self.seed,
                "repeat": self.repeat, "split_documents": self._split_counts[0],
                "split_tokens": self._split_counts[1]}

    def get_state(self) -> dict:
        """JSON-serializable position, identical on every process: global batches yielded, the
        epoch and stream offset they reached, the settings they depend on, and the process
        count that saved it (informational). The RNG needs no state beyond the batch counter."""
        position = self._global_position(self._batch_index)
        return {"format": STATE_FORMAT, "version": STATE_VERSION,
                "batch_index": self._batch_index,
                "epoch": position // self._stream.epoch_length, "stream_position": position,
                "rng": {"kind": "counter", "seed": self.seed, "counter": self._batch_index},
                "saved_by_process_count": self.process_count, **self._config()}

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state()` dict saved by any process of a run with any process
        count; the next batches equal the uninterrupted run's (same process count) or hold the
        same tokens (another count)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an MLMBatches state (format {state.get('format')!r})")
        state = _upgrade(state)
        config = self._config()
        for key in _STATE_KEYS:
            if state.get(key) != config[key]:
                raise ValueError(f"saved data state has {key}={state.get(key)!r} but this iterator "
                                 f"has {key}={config[key]!r}; resume with the same data settings")
        self._batch_index = int(state["batch_index"])


def _upgrade(state: dict) -> dict:
    """A version-1 state (per-process slices of every shard) as version 2: the layouts agree
    only for a single process, so only a one-process state converts."""
    if state.get("version", 1) >= STATE_VERSION:
        return state
    if state.get("process_count") != 1:
        raise ValueError(f"saved data state is version 1 from {state.get('process_count')} "
                         f"processes, whose data layout this version no longer reads; restart "
                         f"the run in a new workdir")
    return {**state, "global_batch_size": state["batch_size"]}
