"""GLUE data: official TSV layouts, pair tokenization, length buckets, job scheduling, config."""

import importlib.util
import json
import math
import os
import threading
import time

import numpy as np
import pytest

from mosaicbert_jax.glue import batching, report
from mosaicbert_jax.glue.data import RawSplit, encode_split, read_glue_tsv
from mosaicbert_jax.glue.schedule import Job, run_jobs
from mosaicbert_jax.glue.tasks import GLUE_TASKS, get_task, parse_task_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "good", "bad", "film"]


def make_tokenizer(directory, words=WORDS):
    """A BERT WordPiece tokenizer over a tiny vocab.txt ([CLS] a [SEP] b [SEP])."""
    vocab_file = os.path.join(directory, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(SPECIAL + list(words)) + "\n")
    try:
        from mosaicbert_jax.data.tokenizer import load_tokenizer
    except ImportError:  # the tokenizer module is not there yet: build the same by hand
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
        tok = Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return tok
    return load_tokenizer(vocab_file)


def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join("\t".join(map(str, line)) for line in lines) + "\n")


MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
               "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
               "sentence2", "label1", "gold_label"]
STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2",
               "sentence1", "sentence2", "score"]


def test_official_layouts(tmp_path):
    write(tmp_path / "CoLA/dev.tsv", [["gj04", 1, "", "The cat sat."],
                                      ["gj04", 0, "*", "Cat the sat."]])
    cola = read_glue_tsv(GLUE_TASKS["cola"], str(tmp_path / "CoLA/dev.tsv"))
    assert cola.texts == (["The cat sat.", "Cat the sat."],) and cola.labels.tolist() == [1, 0]

    write(tmp_path / "MNLI/dev_matched.tsv",
          [MNLI_HEADER] + [[i, 0, 0, "g", "p", "p", "p", "p", f"premise {i}", f"hyp {i}",
                            lab, lab] for i, lab in
                           enumerate(["neutral", "contradiction", "entailment"])])
    mnli = read_glue_tsv(GLUE_TASKS["mnli"], str(tmp_path / "MNLI/dev_matched.tsv"))
    assert mnli.labels.tolist() == [1, 2, 0]  # tfds order: entailment, neutral, contradiction
    assert mnli.texts == (["premise 0", "premise 1", "premise 2"], ["hyp 0", "hyp 1", "hyp 2"])

    write(tmp_path / "MRPC/train.tsv",
          [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], [1, 7, 8, "a b", "c d"],
           [0, 9, 10, 'say "hi', "e"]])  # an unbalanced quote must not swallow lines
    mrpc = read_glue_tsv(GLUE_TASKS["mrpc"], str(tmp_path / "MRPC/train.tsv"))
    assert mrpc.texts == (["a b", 'say "hi'], ["c d", "e"]) and mrpc.labels.tolist() == [1, 0]

    write(tmp_path / "STS-B/dev.tsv", [STSB_HEADER, [0, "g", "f", 2012, 1, "s", "s", "x", "y",
                                                     "4.250"]])
    stsb = read_glue_tsv(GLUE_TASKS["stsb"], str(tmp_path / "STS-B/dev.tsv"))
    assert stsb.labels.dtype == np.float32 and stsb.labels.tolist() == [4.25]

    write(tmp_path / "QQP/train.tsv",
          [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
           [0, 1, 2, "q one", "q two", 1], [1, 3, 4, "broken row"], [2, 5, 6, "x", "y", 0]])
    qqp = read_glue_tsv(GLUE_TASKS["qqp"], str(tmp_path / "QQP/train.tsv"))
    assert qqp.labels.tolist() == [1, 0] and qqp.skipped_rows == 1

    write(tmp_path / "RTE/dev.tsv", [["index", "sentence1", "sentence2", "label"],
                                     [0, "a", "b", "not_entailment"], [1, "c", "d", "maybe"]])
    with pytest.raises(ValueError, match=r"RTE/dev.tsv:3: label 'maybe'"):
        read_glue_tsv(GLUE_TASKS["rte"], str(tmp_path / "RTE/dev.tsv"))
    write(tmp_path / "QNLI/dev.tsv", [["index", "question", "label"], [0, "q", "entailment"]])
    with pytest.raises(ValueError, match=r"lacks columns \['sentence'\]"):
        read_glue_tsv(GLUE_TASKS["qnli"], str(tmp_path / "QNLI/dev.tsv"))
    with pytest.raises(FileNotFoundError, match="data_dir"):
        read_glue_tsv(GLUE_TASKS["sst2"], str(tmp_path / "SST-2/train.tsv"))


def test_task_table():
    assert parse_task_list("RTE,sst-2,mnli, stsb") == ["mnli", "sst2", "stsb", "rte"]
    assert get_task("STS-B").is_regression and get_task("stsb").num_labels == 1
    assert GLUE_TASKS["mnli"].result_names() == ["matched_accuracy", "mismatched_accuracy"]
    with pytest.raises(ValueError, match="WNLI is excluded"):
        parse_task_list("wnli")


def test_encode_pairs_with_token_types_and_counted_truncation(tmp_path):
    tok = make_tokenizer(str(tmp_path))
    raw = RawSplit((["the cat sat", "the cat sat on a mat the dog ran"], ["a dog", "good"]),
                   np.array([1, 0], np.int32), "test")
    encoded = encode_split(tok, raw, max_seq_len=8)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    ids = [tok.token_to_id(w) for w in "the cat sat".split()]
    assert encoded.input_ids[0].tolist() == [cls, *ids, sep, tok.token_to_id("a"),
                                             tok.token_to_id("dog"), sep]
    assert encoded.token_type_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert encoded.lengths.tolist() == [8, 8] and encoded.num_truncated == 1
    # Longest-first truncation keeps the whole short second text.
    assert encoded.input_ids[1][-2:].tolist() == [tok.token_to_id("good"), sep]
    assert tok.truncation is None  # the caller's tokenizer is left as it was
    single = encode_split(tok, RawSplit((["good film"],), np.array([1]), "t"), 128)
    assert single.token_type_ids[0].tolist() == [0, 0, 0, 0] and single.num_truncated == 0


def test_buckets_cover_every_example_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 129, 203)
    buckets = batching.make_buckets(128, (16, 32, 64, 256))
    assert buckets == (16, 32, 64, 128)
    for group in (True, False):
        plans = batching.train_plan(lengths, buckets, 8, rng, group)
        assert len(plans) == batching.steps_per_epoch(lengths, buckets, 8, group)
        seen = np.sort(np.concatenate([p.indices for p in plans]))
        np.testing.assert_array_equal(seen, np.arange(203))
        for p in plans:
            assert lengths[p.indices].max() <= p.seq_len
            smallest = buckets[int(np.searchsorted(buckets, lengths[p.indices].max()))]
            assert p.seq_len == smallest  # padded to the smallest bucket that fits
            if group:
                assert (lengths[p.indices] > buckets[buckets.index(p.seq_len) - 1]).all() \
                    if p.seq_len != buckets[0] else True
    evals = batching.eval_plan(lengths, buckets, 16)
    np.testing.assert_array_equal(np.sort(np.concatenate([p.indices for p in evals])),
                                  np.arange(203))
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        batching.bucket_index(np.array([200]), buckets)


def test_collate_pads_with_weightless_rows(tmp_path):
    tok = make_tokenizer(str(tmp_path))
    raw = RawSplit((["the cat", "a dog ran"], ["good", "bad film"]), np.array([1, 0]), "t")
    split = encode_split(tok, raw, 16)
    batch = batching.collate(split, batching.BatchPlan(np.array([1, 0]), 16), batch_size=4)
    assert batch["input_ids"].shape == (4, 16)
    assert batch["weights"].tolist() == [1, 1, 0, 0]
    assert batch["labels"].tolist()[:2] == [0, 1]
    np.testing.assert_array_equal(batch["segment_ids"].sum(1), [8, 6, 0, 0])
    np.testing.assert_array_equal(batch["input_ids"][1, :6], split.input_ids[0])
    np.testing.assert_array_equal(batch["token_type_ids"][0, :8], split.token_type_ids[1])
    assert (batch["input_ids"][:, 8:] == 0).all()


def test_run_jobs_sequential_and_parallel_with_dependency():
    jobs = [Job(("mnli", 1)), Job(("sst2", 1)), Job(("sst2", 2)), Job(("rte", 1), ("mnli", 1)),
            Job(("rte", 2), ("mnli", 1))]
    order = []
    sequential = run_jobs(jobs, [["dev0", "dev1"]],
                          lambda job, devices, done: order.append(job.key) or len(devices))
    assert order == [j.key for j in jobs] and set(sequential.values()) == {2}

    lock, running, events = threading.Lock(), [0], []

    def run(job, devices, done):
        with lock:
            running[0] += 1
            events.append(("start", job.key, running[0]))
        time.sleep(0.05 if job.key[0] != "mnli" else 0.2)
        if job.depends_on:
            assert job.depends_on in done  # the MNLI result is there to start from
        with lock:
            running[0] -= 1
            events.append(("end", job.key, running[0]))
        return devices[0]

    results = run_jobs(jobs, [["gpu0"], ["gpu1"]], run)
    assert set(results) == {j.key for j in jobs}
    assert max(e[2] for e in events if e[0] == "start") == 2  # two device sets -> 2 at once
    mnli_end = events.index(("end", ("mnli", 1), next(
        e[2] for e in events if e[:2] == ("end", ("mnli", 1)))))
    rte_starts = [i for i, e in enumerate(events) if e[0] == "start" and e[1][0] == "rte"]
    assert min(rte_starts) > mnli_end

    def fail_mnli(job, devices, done):
        if job.key[0] == "mnli":
            raise RuntimeError("mnli diverged")
        return 0

    with pytest.raises(RuntimeError, match="mnli diverged"):
        run_jobs(jobs, [["gpu0"], ["gpu1"]], fail_mnli)
    with pytest.raises(ValueError, match="list dependencies first"):
        run_jobs(jobs[::-1], [["gpu0"]], run)


def test_report_median_table_and_strict_json(tmp_path):
    per_seed = {19: {"pearson": 0.8, "spearman": 0.7}, 8364: {"pearson": 0.9, "spearman": 0.6},
                717: {"pearson": 0.1, "spearman": 0.65}}
    medians = report.median_over_seeds(per_seed)
    assert medians == {"pearson": 0.8, "spearman": 0.65}
    tasks = {"stsb": {"metrics": medians, "score": report.task_score(medians),
                      "per_seed": per_seed},
             "cola": {"metrics": {"matthews_corr": float("nan")}, "score": 0.5,
                      "per_seed": {1: {"matthews_corr": float("nan")}}}}
    table = report.format_table(tasks)
    assert "STS-B" in table and "80.00" in table and "65.00" in table and "nan" in table
    assert table.index("CoLA") < table.index("STS-B")  # the spec's task order
    assert "GLUE average over 2 task(s): 61.25" in table
    path = str(tmp_path / "out" / "results.json")
    report.write_json(path, {"tasks": tasks, "x": np.float32(0.5)})
    loaded = json.load(open(path))
    assert loaded["tasks"]["cola"]["metrics"]["matthews_corr"] is None and loaded["x"] == 0.5


def test_config_file_matches_the_recipe():
    spec = importlib.util.spec_from_file_location("glue_config",
                                                  os.path.join(ROOT, "configs", "glue.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert parse_task_list(config.tasks) == ["mnli", "qqp", "qnli", "sst2", "cola", "stsb",
                                             "mrpc", "rte"]
    seeds = {name: len(config.per_task[name].seeds) for name in config.per_task}
    assert seeds == dict(mnli=1, qqp=1, qnli=1, sst2=3, cola=4, stsb=5, mrpc=5, rte=5)
    assert config.optimizer.warmup_fraction == 0.06 and config.dtype == "bfloat16"
    assert set(config.start_from_mnli) == {"rte", "mrpc", "stsb"}
    assert math.isclose(config.per_task.rte.learning_rate, 1e-5)
