"""MLMBatches: packing fill, exact coverage of an epoch, masking statistics, resume, multi-host
(disjoint rows per process, states that resume on any process count). The masking statistics
hold for SyntheticMLMBatches too: the same packing and masking code."""

import collections
import itertools
import json

import numpy as np
import pytest

from mosaicbert_jax.data import MLMBatches, read_documents
from mosaicbert_jax.data.synthetic import SYNTHETIC_SPECIAL as SPECIAL
from mosaicbert_jax.data.synthetic import SyntheticMLMBatches, write_synthetic_shards

VOCAB = 8192


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~200k tokens of long-tailed documents in 3 shards, plus a small eval split."""
    path = str(tmp_path_factory.mktemp("synthetic"))
    write_synthetic_shards(path, 200_000, VOCAB, seed=1, eval_tokens=20_000, shard_documents=180)
    return path


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("million"))
    write_synthetic_shards(path, 1_000_000, VOCAB, seed=2, shard_documents=1000)
    return path


def unmasked(batch):
    """input_ids with the selected slots put back to their original tokens."""
    ids = batch["input_ids"].copy()
    rows, slots = np.nonzero(batch["masked_weights"])
    ids[rows, batch["masked_positions"][rows, slots]] = batch["masked_labels"][rows, slots]
    return ids


def segments(batches):
    """(content tokens, first segment of its row, last segment of its row) in stream order."""
    for batch in batches:
        ids, seg = unmasked(batch), batch["segment_ids"]
        for row_ids, row_seg in zip(ids, seg):
            count = row_seg.max()
            assert np.all(row_ids[row_seg == 0] == SPECIAL.pad)
            assert np.all(row_seg[:np.count_nonzero(row_seg)] > 0), "padding only at the end"
            for s in range(1, count + 1):
                tokens = row_ids[row_seg == s]
                assert tokens[0] == SPECIAL.cls and tokens[-1] == SPECIAL.sep and len(tokens) > 2
                assert not np.isin(tokens[1:-1], SPECIAL.ids).any()
                yield tuple(tokens[1:-1].tolist()), s == 1, s == count


def check_epoch(shards_dir, split, iterators):
    """Every document of the split appears exactly once across one epoch of `iterators`."""
    originals = collections.Counter(tuple(d.tolist()) for d in read_documents(shards_dir, split))
    found = collections.Counter()
    for iterator in iterators:
        buffer, previous_last = [], True
        for content, first, last in segments(iterator):
            if buffer:
                assert first and previous_last, "a document continued inside a row"
            buffer.extend(content)
            if originals[tuple(buffer)] > found[tuple(buffer)]:
                found[tuple(buffer)] += 1
                buffer = []
            previous_last = last
        assert buffer == [], "the epoch ended inside a document"
    assert found == originals


def test_shapes_and_dtypes(corpus):
    it = MLMBatches(corpus, "train", batch_size=4, seq_len=64)
    batch = next(it)
    assert it.max_predictions == 19  # ceil(0.3 * 62)
    assert it.vocab_size == VOCAB and it.special_ids == SPECIAL.as_dict()
    expected = {"input_ids": ((4, 64), np.int32), "segment_ids": ((4, 64), np.int32),
                "masked_positions": ((4, 19), np.int32), "masked_weights": ((4, 19), np.float32),
                "masked_labels": ((4, 19), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    for _ in range(20):
        batch = next(it)
        weights = batch["masked_weights"]
        assert np.all(batch["masked_positions"][weights == 0] == 0)
        assert np.all(batch["masked_labels"][weights == 0] == 0)
        assert np.all(np.diff(weights, axis=1) <= 0), "valid slots come first"
    roomy = next(MLMBatches(corpus, "train", batch_size=4, seq_len=64, max_predictions=80))
    assert roomy["masked_positions"].shape == (4, 80)
    assert 0 < roomy["masked_weights"].sum() <= 4 * 19


def test_one_epoch_covers_every_token_once(corpus):
    it = MLMBatches(corpus, "train", batch_size=8, seq_len=128, repeat=False)
    batches = list(it)
    assert len(batches) == it.batches_per_epoch
    check_epoch(corpus, "train", [batches])
    with pytest.raises(StopIteration):
        next(it)


def test_packing_fill_on_long_tailed_corpus(corpus):
    it = MLMBatches(corpus, "train", batch_size=8, seq_len=128, repeat=False)
    ids = np.concatenate([b["segment_ids"] for b in it])
    nonempty = ids[(ids > 0).any(axis=1)]
    fill = (nonempty > 0).mean()
    print(f"\npacking fill over one epoch (seq_len 128, {len(nonempty)} rows): {fill:.4%}")
    assert fill >= 0.99
    steady = np.concatenate([b["segment_ids"] for b, _ in zip(
        MLMBatches(corpus, "train", batch_size=8, seq_len=512), range(30))])
    assert (steady > 0).mean() >= 0.99


def million_token_batches(source, million):
    """About a million maskable tokens of 64 x 128 batches from `source`."""
    if source == "shards":
        return MLMBatches(million, "train", batch_size=64, seq_len=128, repeat=False)
    return itertools.islice(SyntheticMLMBatches(64, 128, VOCAB, seed=2, mean_doc_len=230), 125)


@pytest.mark.parametrize("source", ["shards", "synthetic"])
def test_masking_statistics_on_a_million_tokens(source, request):
    it = million_token_batches(source, request.getfixturevalue("million")
                               if source == "shards" else None)
    maskable = selected = as_mask = as_random = unchanged = 0
    for batch in it:
        original = unmasked(batch)
        special = np.isin(original, SPECIAL.ids)
        maskable += np.count_nonzero(~special)
        rows, slots = np.nonzero(batch["masked_weights"])
        positions = batch["masked_positions"][rows, slots]
        labels = batch["masked_labels"][rows, slots]
        assert not special[rows, positions].any(), "a special token or padding was selected"
        assert np.array_equal(original[rows, positions], labels)
        now = batch["input_ids"][rows, positions]
        selected += len(rows)
        as_mask += np.count_nonzero(now == SPECIAL.mask)
        as_random += np.count_nonzero((now != SPECIAL.mask) & (now != labels))
        unchanged += np.count_nonzero(now == labels)
        untouched = np.ones_like(special)
        untouched[rows, positions] = False
        assert np.array_equal(batch["input_ids"][untouched], original[untouched])
        random_ids = now[(now != SPECIAL.mask) & (now != labels)]
        assert not np.isin(random_ids, SPECIAL.ids).any() and (random_ids < VOCAB).all()
    assert maskable >= 950_000
    print(f"\nselected {selected / maskable:.4%} of {maskable} tokens; [MASK] "
          f"{as_mask / selected:.2%}, random {as_random / selected:.2%}, "
          f"unchanged {unchanged / selected:.2%}")
    assert abs(selected / maskable - 0.30) < 0.001
    assert abs(as_mask / selected - 0.80) < 0.005
    assert abs(as_random / selected - 0.10) < 0.005
    assert abs(unchanged / selected - 0.10) < 0.005


@pytest.mark.parametrize("source", ["shards", "synthetic"])
def test_eval_masking_rate(source, corpus):
    if source == "shards":
        it = MLMBatches(corpus, "eval", batch_size=16, seq_len=128, mask_prob=0.15, repeat=False)
        batches = list(it)
    else:
        it = SyntheticMLMBatches(16, 128, VOCAB, mask_prob=0.15, seed=1, mean_doc_len=230)
        batches = [next(it) for _ in range(12)]
    assert it.max_predictions == 19  # ceil(0.15 * 126)
    selected = sum(b["masked_weights"].sum() for b in batches)
    maskable = sum(np.count_nonzero(~np.isin(unmasked(b), SPECIAL.ids)) for b in batches)
    assert abs(selected / maskable - 0.15) < 0.003


def test_resume_gives_identical_batches(corpus):
    # 150 batches of 8 x 126 stream tokens run past the end of the ~200k-token epoch.
    reference = MLMBatches(corpus, "train", batch_size=8, seq_len=128)
    expected = [next(reference) for _ in range(230)]
    for stop in (0, 7, 200):
        first = MLMBatches(corpus, "train", batch_size=8, seq_len=128)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.get_state()))
        assert state["batch_index"] == stop
        resumed = MLMBatches(corpus, "train", batch_size=8, seq_len=128)
        resumed.set_state(state)
        for want in expected[stop:stop + 30]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    assert reference.get_state()["epoch"] == 1


def test_epochs_reshuffle_and_cover_again(corpus):
    it = MLMBatches(corpus, "train", batch_size=8, seq_len=128)
    per_epoch = it.batches_per_epoch
    first_epoch = [next(it) for _ in range(per_epoch)]
    assert it.epoch == 1
    second = next(it)
    assert not np.array_equal(second["input_ids"], first_epoch[0]["input_ids"])


def test_same_seed_same_batches_other_seed_differs(corpus):
    a = [next(MLMBatches(corpus, "train", 4, 64, seed=3)) for _ in range(2)]
    b = MLMBatches(corpus, "train", 4, 64, seed=4)
    np.testing.assert_array_equal(a[0]["input_ids"], a[1]["input_ids"])
    assert not np.array_equal(a[0]["input_ids"], next(b)["input_ids"])


def _global_batches(per_process_epochs):
    """Each global batch: the processes' rows in process order, as one batch."""
    return [{key: np.concatenate([batch[key] for batch in parts]) for key in parts[0]}
            for parts in zip(*per_process_epochs)]


def test_processes_read_disjoint_rows_that_cover_the_split_once(corpus):
    iterators = [MLMBatches(corpus, "train", 4, 128, process_index=p, process_count=3,
                            repeat=False) for p in range(3)]
    assert len({it.batches_per_epoch for it in iterators}) == 1
    epochs = [list(it) for it in iterators]
    assert len({len(e) for e in epochs}) == 1, "every process yields the same number of batches"
    # Put back together in global order, the rows hold every document exactly once: no token
    # is read by two processes and none is missed.
    check_epoch(corpus, "train", [_global_batches(epochs)])
    tokens = sum(np.count_nonzero(~np.isin(unmasked(b), SPECIAL.ids)) for e in epochs for b in e)
    assert tokens == json.load(open(f"{corpus}/meta.json"))["splits"]["train"]["num_tokens"]


def test_global_batch_tokens_do_not_depend_on_the_process_count(corpus):
    one = MLMBatches(corpus, "train", 12, 128)
    three = [MLMBatches(corpus, "train", 4, 128, process_index=p, process_count=3)
             for p in range(3)]
    two = [MLMBatches(corpus, "train", 6, 128, process_index=p, process_count=2)
           for p in range(2)]
    for _ in range(3):
        expected = unmasked(next(one))
        for group in (three, two):
            got = _global_batches([[next(it)] for it in group])[0]
            np.testing.assert_array_equal(unmasked(got), expected)


def test_a_state_resumes_on_every_process_and_on_another_process_count(corpus):
    def run(count, batches, state=None):
        iterators = [MLMBatches(corpus, "train", 12 // count, 128, process_index=p,
                                process_count=count) for p in range(count)]
        for it in iterators:
            if state is not None:
                it.set_state(state)
        got = [_global_batches([[next(it)] for it in iterators])[0] for _ in range(batches)]
        states = [json.loads(json.dumps(it.get_state())) for it in iterators]
        assert all(s == states[0] for s in states), "every process saves the same state"
        return got, states[0]

    uninterrupted, _ = run(2, 5)
    _, saved = run(2, 2)
    assert saved["batch_index"] == 2 and saved["saved_by_process_count"] == 2
    resumed, _ = run(2, 3, saved)
    for want, got in zip(uninterrupted[2:], resumed):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    for count in (1, 3):  # same tokens; the masks are drawn per process, so they differ
        other, _ = run(count, 3, saved)
        for want, got in zip(uninterrupted[2:], other):
            np.testing.assert_array_equal(unmasked(got), unmasked(want))
    with pytest.raises(ValueError, match="global_batch_size=12 but this iterator has "
                                         "global_batch_size=8"):
        MLMBatches(corpus, "train", 4, 128, process_index=0, process_count=2).set_state(saved)


def test_version_1_states_of_one_process_still_resume(corpus):
    v1 = {k: v for k, v in MLMBatches(corpus, "train", 4, 128).get_state().items()
          if k not in ("global_batch_size", "saved_by_process_count")}
    v1.update(version=1, batch_size=4, process_index=0, process_count=1, batch_index=3)
    it = MLMBatches(corpus, "train", 4, 128)
    it.set_state(v1)
    np.testing.assert_array_equal(next(it)["input_ids"],
                                  MLMBatches(corpus, "train", 4, 128).batch_at(3)["input_ids"])
    with pytest.raises(ValueError, match="version 1 from 2 processes"):
        it.set_state(dict(v1, process_count=2))


def test_clear_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="max_predictions"):
        MLMBatches(corpus, "train", 4, 128, max_predictions=10)
    with pytest.raises(ValueError, match="split 'validation'"):
        MLMBatches(corpus, "validation", 4, 128)
    with pytest.raises(ValueError, match="does not exist"):
        MLMBatches(str(tmp_path / "nowhere"), "train", 4, 128)
    with pytest.raises(ValueError, match="no meta.json"):
        MLMBatches(str(tmp_path), "train", 4, 128)
    with pytest.raises(ValueError, match="seq_len"):
        MLMBatches(corpus, "train", 4, 4)
    state = MLMBatches(corpus, "train", 4, 128).get_state()
    with pytest.raises(ValueError, match="global_batch_size"):
        MLMBatches(corpus, "train", 8, 128).set_state(state)


@pytest.mark.parametrize("mean_doc_len", [None, 40])
def test_synthetic_batches_have_the_real_layout_and_resume(mean_doc_len):
    it = SyntheticMLMBatches(8, 128, VOCAB, seed=5, mean_doc_len=mean_doc_len)
    assert it.max_predictions == 38  # ceil(0.3 * 126), as MLMBatches; not ceil(0.3 * 128)
    batches = [next(it) for _ in range(6)]
    shapes = {k: (v.shape, v.dtype) for k, v in batches[0].items()}
    assert shapes == {"input_ids": ((8, 128), np.int32), "segment_ids": ((8, 128), np.int32),
                      "masked_positions": ((8, 38), np.int32),
                      "masked_weights": ((8, 38), np.float32),
                      "masked_labels": ((8, 38), np.int32)}
    found = list(segments(batches))  # every segment is [CLS] content [SEP], padding at the end
    if mean_doc_len is None:  # one full-row segment per row
        assert len(found) == 6 * 8 and all(len(content) == 126 for content, _, _ in found)
    else:
        assert len(found) > 6 * 8 * 2
    fill = np.mean([(b["segment_ids"] > 0).mean() for b in batches])
    assert fill >= 0.98
    state = json.loads(json.dumps(it.get_state()))
    following = next(it)
    resumed = SyntheticMLMBatches(8, 128, VOCAB, seed=5, mean_doc_len=mean_doc_len)
    resumed.set_state(state)
    for key, value in next(resumed).items():
        np.testing.assert_array_equal(value, following[key])
