"""GLUE end to end: the command line on GLUE-layout TSVs (SST-2, MNLI, STS-B) from a saved
checkpoint, jobs run in parallel threads, and a tiny model learning a synthetic pair task."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_jax.checkpoint import load_pretrained, save_pretrained
from mosaicbert_jax.glue.data import RawSplit, encode_split
from mosaicbert_jax.glue.finetune import data_parallel_mesh, finetune, initial_params
from mosaicbert_jax.glue.schedule import Job, run_jobs
from mosaicbert_jax.glue.tasks import GlueTask

from cpu_env import xla_flags
from test_glue_data import MNLI_HEADER, STSB_HEADER, make_tokenizer, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOUNS = ["cat", "dog", "bird", "fish", "cow", "pig", "fox", "owl"]
FILLER = ["the", "a", "sat", "on", "mat", "ran", "film"]
WORDS = NOUNS + FILLER + ["good", "bad"]


def _sentence(rng, first):
    return " ".join([first, *rng.choice(FILLER, rng.integers(1, 6))])


def write_glue_folder(root, rng, n_train=48, n_dev=24):
    """Small SST-2 (single text), STS-B (regression) and MNLI (pairs) files, GLUE layout."""
    for split, n in (("train", n_train), ("dev", n_dev)):
        sst = [["sentence", "label"]]
        stsb = [STSB_HEADER]
        for i in range(n):
            label = int(rng.integers(2))
            sst.append([_sentence(rng, "good" if label else "bad"), label])
            a, b = rng.choice(NOUNS, 2, replace=False)
            score = float(rng.integers(0, 26)) / 5
            stsb.append([i, "main", "f", 2012, i, "s", "s", _sentence(rng, a),
                         _sentence(rng, a if score > 2.5 else b), f"{score:.3f}"])
        write(os.path.join(root, "SST-2", f"{split}.tsv"), sst)
        write(os.path.join(root, "STS-B", f"{split}.tsv"), stsb)
    names = ["entailment", "neutral", "contradiction"]
    for split, n in (("train", n_train), ("dev_matched", n_dev), ("dev_mismatched", n_dev)):
        rows = [MNLI_HEADER]
        for i in range(n):
            label = names[int(rng.integers(3))]
            a, b = rng.choice(NOUNS, 2, replace=False)
            rows.append([i, i, f"{i}e", "fiction", "(", "(", "(", "(", _sentence(rng, a),
                         _sentence(rng, a if label == "entailment" else b), label, label])
        write(os.path.join(root, "MNLI", f"{split}.tsv"), rows)


def tiny_config(**overrides):
    values = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                  intermediate_size=64)
    values.update(overrides)
    return MosaicBertConfig.tiny(**values)


def save_tiny_mlm(directory, tokenizer_dir, **overrides):
    """A randomly initialised tiny MLM model written with save_pretrained (+ vocab.txt)."""
    config = tiny_config(**overrides)
    ids = np.zeros((1, 8), np.int32)
    params = MosaicBertForMaskedLM(config).init(jax.random.key(0), ids, np.ones_like(ids),
                                                ids)["params"]
    save_pretrained(directory, params, config,
                    tokenizer_file=os.path.join(tokenizer_dir, "vocab.txt"))
    return params


def glue_config(**shared):
    """configs/glue.py with a per_task entry for PAIR_TASK and the given shared keys."""
    spec = importlib.util.spec_from_file_location("glue_config_file",
                                                  os.path.join(ROOT, "configs", "glue.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update(shared)
    return config


def pair_task_settings(config, **values):
    config.per_task[PAIR_TASK.name] = ml_collections.ConfigDict(dict(seeds=(0,), **values))
    return config


def _read_predictions(path):
    rows = np.loadtxt(path, delimiter="\t", skiprows=1)
    return rows[:, 1], rows[:, 2]


def test_command_line_end_to_end_on_glue_tsvs(tmp_path):
    rng = np.random.default_rng(0)
    write_glue_folder(str(tmp_path / "glue"), rng)
    make_tokenizer(str(tmp_path), WORDS)
    save_tiny_mlm(str(tmp_path / "ckpt"), str(tmp_path), num_hidden_layers=1)
    workdir = tmp_path / "work"
    args = [
        "--config=configs/glue.py", f"--config.checkpoint={tmp_path / 'ckpt'}",
        f"--config.data_dir={tmp_path / 'glue'}", "--config.tasks=mnli,sst2,stsb",
        f"--config.workdir={workdir}", "--config.dtype=float32", "--config.max_seq_len=12",
        "--config.bucket_lengths=(12,)", "--config.eval_batch_size=16",
        "--config.log_every_steps=4", "--config.eval_every_epoch=False",
        "--config.per_task.sst2.seeds=(19,)",
        "--config.per_task.stsb.seeds=(19,8364)",
    ]
    for task in ("mnli", "sst2", "stsb"):
        args += [f"--config.per_task.{task}.epochs=2", f"--config.per_task.{task}.batch_size=8",
                 f"--config.per_task.{task}.learning_rate=1e-3"]
    # Two host devices: the sequential path runs each job data parallel over both.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    proc = subprocess.run([sys.executable, "-m", "mosaicbert_jax.glue", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "4 jobs (mnli, sst2, stsb) one after another on 2 device(s)" in out
    assert "mnli seed=19: step 4/12 epoch 1 loss" in out  # progress lines
    assert "stsb seed=8364: start from mnli" in out and "truncated to 12 tokens" in out
    assert "GLUE average over 3 task(s)" in out and "MNLI" in out and "STS-B" in out

    results = json.load(open(workdir / "glue_results.json"))
    assert results["num_tasks"] == 3 and results["tasks"]["stsb"]["init"] == "mnli"
    assert results["tasks"]["sst2"]["init"] == "pretrained"
    assert results["tasks"]["mnli"]["train_examples"] == 48
    assert results["tasks"]["mnli"]["steps"] == 12  # 2 epochs x 48 / 8
    # Every job logs like pretraining: metrics.jsonl with train and eval records, TensorBoard.
    for task, seed in (("mnli", 19), ("sst2", 19), ("stsb", 19), ("stsb", 8364)):
        job_dir = workdir / "logs" / task / f"seed_{seed}"
        records = [json.loads(line) for line in open(job_dir / "metrics.jsonl")]
        train_steps = [r["step"] for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        assert train_steps and train_steps == sorted(train_steps) and len(evals) == 1
        assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
        assert list((job_dir / "tensorboard").glob("events.out.tfevents.*"))
    mnli_evals = [json.loads(line) for line in open(workdir / "logs/mnli/seed_19/metrics.jsonl")]
    assert mnli_evals[-1]["matched_accuracy"] == pytest.approx(
        results["tasks"]["mnli"]["metrics"]["matched_accuracy"])
    # The fine-tuned MNLI checkpoint is a pretrained folder that `convert to-torch` converts.
    finetuned, finetuned_config = load_pretrained(str(workdir / "mnli_finetuned_seed19"))
    assert finetuned_config.num_labels == 3 and set(finetuned) == {"bert", "pooler_dense",
                                                                   "classifier"}
    convert = subprocess.run([sys.executable, "-m", "mosaicbert_jax.convert", "to-torch",
                              "--checkpoint", str(workdir / "mnli_finetuned_seed19"),
                              "--out", str(tmp_path / "mnli_torch")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-2000:]
    assert "wrote classification model" in convert.stdout
    hf_config = json.load(open(tmp_path / "mnli_torch" / "config.json"))
    assert hf_config["architectures"] == ["BertForSequenceClassification"]
    assert (tmp_path / "mnli_torch" / "vocab.txt").exists()  # the run's tokenizer came along

    def preds(task, seed, stem="dev"):
        return _read_predictions(workdir / "predictions" / task / f"seed_{seed}" / f"{stem}.tsv")

    tasks = results["tasks"]
    # Labels written next to the predictions are the dev files' labels, in file order.
    sst_dev = np.loadtxt(tmp_path / "glue/SST-2/dev.tsv", delimiter="\t", skiprows=1,
                         usecols=1, dtype=str)
    np.testing.assert_array_equal(preds("sst2", 19)[1], sst_dev.astype(float))
    p, y = preds("sst2", 19)
    assert tasks["sst2"]["metrics"]["accuracy"] == pytest.approx(
        sklearn.metrics.accuracy_score(y, p))
    for stem, prefix in (("dev_matched", "matched_"), ("dev_mismatched", "mismatched_")):
        p, y = preds("mnli", 19, stem)
        assert set(np.unique(y)) <= {0, 1, 2}
        assert tasks["mnli"]["metrics"][prefix + "accuracy"] == pytest.approx(
            sklearn.metrics.accuracy_score(y, p))
    per_seed = {}
    for seed in (19, 8364):
        p, y = preds("stsb", seed)
        per_seed[seed] = (scipy.stats.pearsonr(p, y)[0], scipy.stats.spearmanr(p, y)[0])
        assert tasks["stsb"]["per_seed"][str(seed)]["pearson"] == pytest.approx(per_seed[seed][0])
        assert tasks["stsb"]["per_seed"][str(seed)]["spearman"] == pytest.approx(
            per_seed[seed][1])
    assert tasks["stsb"]["metrics"]["pearson"] == pytest.approx(
        np.median([v[0] for v in per_seed.values()]))
    scores = [np.mean(list(t["metrics"].values())) for t in tasks.values()]
    assert results["glue_average"] == pytest.approx(np.mean(scores))


def _pair_task(rng, n):
    """Label 1 when both texts start with a noun of the same half of NOUNS (an XNOR of the
    two texts: neither text alone says anything about the label)."""
    first, second, labels = [], [], []
    for _ in range(n):
        a, b = rng.choice(NOUNS), rng.choice(NOUNS)
        first.append(_sentence(rng, a))
        second.append(_sentence(rng, b))
        labels.append(int((a in NOUNS[:4]) == (b in NOUNS[:4])))
    return RawSplit((first, second), np.asarray(labels, np.int32), "synthetic")


PAIR_TASK = GlueTask("same_half", "SAME", ("a", "b"), "label", ("a", "b"), ("no", "yes"),
                     ("accuracy", "f1"))


def test_tiny_model_learns_a_synthetic_pair_task(tmp_path):
    tok = make_tokenizer(str(tmp_path), WORDS)
    rng = np.random.default_rng(1)
    train = encode_split(tok, _pair_task(rng, 2048), 16)
    dev = encode_split(tok, _pair_task(rng, 256), 16)
    config = tiny_config(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                         num_labels=2, hidden_dropout_prob=0.0)
    settings = pair_task_settings(
        glue_config(eval_batch_size=128, max_seq_len=16, bucket_lengths=(16,),
                    log_every_steps=1000, eval_every_epoch=False),
        learning_rate=2e-3, weight_decay=0.0, epochs=12, batch_size=32)
    lines = []
    result = finetune(PAIR_TASK, train, {"dev": dev}, config, None, settings, seed=0,
                      devices=jax.devices(), log=lines.append)
    assert result.steps == 768
    assert result.metrics["accuracy"] > 0.95, lines  # chance is 0.5
    preds, labels = result.predictions["dev"]
    assert result.metrics["accuracy"] == pytest.approx(np.mean(preds == labels))


def test_parallel_jobs_in_threads_start_from_the_checkpoint(tmp_path):
    tok = make_tokenizer(str(tmp_path), WORDS)
    saved = save_tiny_mlm(str(tmp_path / "ckpt"), str(tmp_path))
    loaded, config = load_pretrained(str(tmp_path / "ckpt"))
    config = config.replace(num_labels=2, dtype="float32")
    mesh = data_parallel_mesh(jax.devices(), 8)
    start = initial_params(config, {"bert": loaded["bert"]}, 0, mesh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(start["bert"]),
                           jax.device_get(saved["bert"]))
    assert set(start) == {"bert", "pooler_dense", "classifier"}
    bad = jax.tree_util.tree_map(np.asarray, loaded["bert"])
    bad["embeddings"]["word_embeddings"]["embedding"] = np.zeros((30528, 32), np.float32)
    with pytest.raises(ValueError, match="embedding has shape"):
        initial_params(config, {"bert": bad}, 0, mesh)

    rng = np.random.default_rng(2)
    train, dev = encode_split(tok, _pair_task(rng, 32), 16), encode_split(tok, _pair_task(rng, 16),
                                                                           16)
    settings = pair_task_settings(
        glue_config(eval_batch_size=16, max_seq_len=16, bucket_lengths=(16,)),
        learning_rate=1e-3, weight_decay=1e-4, epochs=1, batch_size=8)

    def run(job, devices, done):
        init = done[job.depends_on].params if job.depends_on else {"bert": loaded["bert"]}
        return finetune(PAIR_TASK, train, {"dev": dev}, config, init, settings, seed=job.key[1],
                        devices=devices, log=lambda m: None, keep_params=True)

    device = jax.devices()[0]  # two "device sets" sharing the one CPU: two threads at once
    results = run_jobs([Job(("a", 1)), Job(("a", 2)), Job(("b", 1), ("a", 1))],
                       [[device], [device]], run)
    assert all(r.steps == 4 for r in results.values())
    # Different seeds train differently; the dependent job started from job ("a", 1).
    assert not np.allclose(results[("a", 1)].params["classifier"]["kernel"],
                           results[("a", 2)].params["classifier"]["kernel"])
    # The same seed in sequence reproduces the threaded result exactly.
    again = run(Job(("a", 1)), [device], {})
    np.testing.assert_array_equal(again.params["classifier"]["kernel"],
                                  results[("a", 1)].params["classifier"]["kernel"])


def test_finetuned_checkpoint_loads_and_converts_to_torch(tmp_path):
    """The fine-tuned MNLI weights a run saves are a save_pretrained folder: load_pretrained
    reads them back exactly and `convert to-torch` writes the classification model."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from mosaicbert_jax.convert import main as convert_main
    from mosaicbert_jax.glue.runner import save_finetuned
    from mosaicbert_jax.param_layout import expected_torch_shapes

    make_tokenizer(str(tmp_path), WORDS)
    config = tiny_config(num_labels=3)
    mesh = data_parallel_mesh(jax.devices(), 8)
    params = jax.device_get(initial_params(config, None, 5, mesh))
    folder = str(tmp_path / "mnli_finetuned_seed19")
    save_finetuned(folder, params, config, str(tmp_path / "vocab.txt"))
    save_finetuned(folder, params, config, str(tmp_path / "vocab.txt"))  # a rerun replaces it
    loaded, loaded_config = load_pretrained(folder)
    assert loaded_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)

    out = tmp_path / "torch"
    assert convert_main(["to-torch", "--checkpoint", folder, "--out", str(out)]) == 0
    hf_config = json.load(open(out / "config.json"))
    assert hf_config["architectures"] == ["BertForSequenceClassification"]
    assert len(hf_config["id2label"]) == 3 and (out / "vocab.txt").exists()
    state_dict = safetensors_numpy.load_file(str(out / "model.safetensors"))
    assert {k: v.shape for k, v in state_dict.items()} == expected_torch_shapes(
        config, "classification")
    np.testing.assert_array_equal(state_dict["classifier.weight"],
                                  params["classifier"]["kernel"].T)


def test_without_a_workdir_the_output_goes_beside_the_checkpoint(tmp_path, monkeypatch):
    from mosaicbert_jax.cli_errors import UserError
    from mosaicbert_jax.glue.runner import run_glue

    write_glue_folder(str(tmp_path / "glue"), np.random.default_rng(0), n_train=16, n_dev=8)
    make_tokenizer(str(tmp_path), WORDS)
    save_tiny_mlm(str(tmp_path / "ckpt"), str(tmp_path), num_hidden_layers=1)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = glue_config(checkpoint=str(tmp_path / "ckpt"), data_dir=str(tmp_path / "glue"),
                         tasks="sst2", dtype="float32", max_seq_len=12, bucket_lengths=(12,),
                         eval_batch_size=8, eval_every_epoch=False, write_predictions=False)
    config.per_task.sst2.update(dict(seeds=(19,), epochs=1, batch_size=8))
    assert config.workdir == ""
    run_glue(config)
    results = json.load(open(tmp_path / "ckpt" / "glue" / "glue_results.json"))
    assert list(results["tasks"]) == ["sst2"]
    assert os.listdir(elsewhere) == []  # nothing in the current directory

    config.checkpoint = ""
    with pytest.raises(UserError, match=r"set --config.workdir=DIR for the GLUE results: with "
                                        r"no --config.checkpoint"):
        run_glue(config)
