"""The GLUE benchmark run: load the start point and data, fine-tune every (task, seed),
take medians over seeds, print the table and write the results JSON.

RTE, MRPC and STS-B (config.start_from_mnli) start from the weights MNLI fine-tuning ended
with (its first seed); everything else starts from the pretrained checkpoint. Each job logs to
<workdir>/logs/<task>/seed_<seed>/ (metrics.jsonl and TensorBoard events, as pretraining does);
the fine-tuned MNLI weights are saved with save_pretrained, so they load and convert to PyTorch
like any other checkpoint.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import threading
import time
from typing import Any, Optional

import jax

from mosaicbert_jax.cli_errors import UserError
from mosaicbert_jax.checkpoint import (checkpoint_root, find_tokenizer_files, load_pretrained,
                                       save_pretrained)
from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.data.tokenizer import load_tokenizer
from mosaicbert_jax.glue import report
from mosaicbert_jax.glue.data import EncodedSplit, check_tokenizer, encode_split, load_split
from mosaicbert_jax.glue.finetune import FinetuneResult, finetune, task_settings
from mosaicbert_jax.glue.schedule import Job, run_jobs
from mosaicbert_jax.glue.tasks import GlueTask, get_task, parse_task_list
from mosaicbert_jax.training.metrics_log import MetricsLog

_PRINT_LOCK = threading.Lock()


def log(message: str) -> None:
    """Progress line to stdout (thread safe, flushed)."""
    with _PRINT_LOCK:
        print(f"[glue {time.strftime('%H:%M:%S')}] {message}", flush=True)


def task_seeds(config: Any, task: GlueTask) -> list[int]:
    """The task's seeds (its settings checked first, so a bad value stops the run at once)."""
    seeds = task_settings(config, task).seeds
    seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"config.per_task.{task.name}.seeds={seeds} must be distinct and "
                         f"non-empty")
    return seeds


def tokenizer_file_for(config: Any) -> Optional[str]:
    """config.tokenizer, else a tokenizer.json / vocab.txt saved next to the checkpoint."""
    path = config.tokenizer
    if not path and config.checkpoint:
        found = [f for f in find_tokenizer_files(checkpoint_root(config.checkpoint))
                 if f.name in ("tokenizer.json", "vocab.txt")]
        path = os.fspath(found[0]) if found else None
    return path or None


def load_tokenizer_for(config: Any) -> Any:
    """The tokenizer of `tokenizer_file_for(config)`; a clear error when there is none."""
    path = tokenizer_file_for(config)
    if not path:
        raise ValueError("no tokenizer: set --config.tokenizer=<tokenizer.json or vocab.txt> "
                         "(or save one in the checkpoint directory)")
    return load_tokenizer(path)


def load_start_point(config: Any) -> tuple[Optional[Any], MosaicBertConfig, str]:
    """(pretrained params or None, encoder config, description) from config.checkpoint."""
    if config.checkpoint:
        params, model_config = load_pretrained(config.checkpoint)
        if "bert" not in params:
            raise ValueError(f"checkpoint {config.checkpoint} has top-level keys "
                             f"{sorted(params)}; expected an MLM model's 'bert' and 'cls'")
        return {"bert": params["bert"]}, model_config, f"pretrained {config.checkpoint}"
    return None, MosaicBertConfig.from_preset(config.model), f"random init ({config.model})"


def save_finetuned(directory: str, params: Any, model_config: MosaicBertConfig,
                   tokenizer_file: Optional[str]) -> None:
    """Fine-tuned weights as a save_pretrained folder, replacing one an earlier run wrote."""
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    save_pretrained(directory, jax.device_get(params), model_config, tokenizer_file)


def load_finetuned(path: str) -> Any:
    """The params of config.mnli_checkpoint (a folder save_finetuned wrote, or any checkpoint)."""
    if not os.path.exists(path):
        raise ValueError(f"config.mnli_checkpoint={path} does not exist; it is the "
                         f"mnli_finetuned_seed<S> folder a run with MNLI writes")
    return load_pretrained(path)[0]


class TaskData:
    """Loads and tokenizes each task's splits once, shared by its seeds and threads."""

    def __init__(self, config: Any, tokenizer: Any):
        self._config, self._tokenizer = config, tokenizer
        self._cache: dict[str, tuple[EncodedSplit, dict[str, EncodedSplit]]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _encode(self, task: GlueTask, tsv_stem: str, tfds_split: str) -> EncodedSplit:
        cfg = self._config
        raw = load_split(task, tsv_stem, tfds_split, cfg.data_dir, cfg.tfds_data_dir)
        encoded = encode_split(self._tokenizer, raw, int(cfg.max_seq_len))
        notes = []
        if raw.skipped_rows:
            notes.append(f"SKIPPED {raw.skipped_rows} malformed rows")
        if encoded.num_truncated:
            notes.append(f"{encoded.num_truncated} truncated to {cfg.max_seq_len} tokens")
        mean = float(encoded.lengths.mean()) if len(encoded) else 0.0
        log(f"{task.name} {tsv_stem}: {len(encoded)} examples from {raw.source}, mean "
            f"{mean:.1f} tokens" + (f" ({'; '.join(notes)})" if notes else ""))
        if len(encoded) == 0:
            raise ValueError(f"{raw.source} holds no examples")
        return encoded

    def get(self, task: GlueTask) -> tuple[EncodedSplit, dict[str, EncodedSplit]]:
        with self._guard:
            lock = self._locks.setdefault(task.name, threading.Lock())
        with lock:
            if task.name not in self._cache:
                train = self._encode(task, "train", "train")
                evals = {s.tsv_stem: self._encode(task, s.tsv_stem, s.tfds_split)
                         for s in task.eval_splits}
                self._cache[task.name] = (train, evals)
            return self._cache[task.name]


def _data_summary(train: EncodedSplit, evals: dict[str, EncodedSplit]) -> dict[str, Any]:
    return {"train_examples": len(train), "train_truncated": train.num_truncated,
            "train_skipped_rows": train.skipped_rows,
            "eval_examples": {k: len(v) for k, v in evals.items()},
            "eval_truncated": {k: v.num_truncated for k, v in evals.items()},
            "eval_skipped_rows": {k: v.skipped_rows for k, v in evals.items()}}


GLUE_OUTPUT_DIR = "glue"  # the output folder inside the checkpoint's, with no config.workdir


def glue_workdir(config: Any) -> str:
    """config.workdir, else `<the checkpoint's folder>/glue`: next to the weights finetuned,
    never in whatever directory the command happens to run in."""
    if config.workdir:
        return os.path.expanduser(config.workdir)
    if config.checkpoint:
        return os.path.join(os.fspath(checkpoint_root(config.checkpoint)), GLUE_OUTPUT_DIR)
    raise UserError("set --config.workdir=DIR for the GLUE results: with no "
                    "--config.checkpoint there is no checkpoint folder to write them beside")


def run_glue(config: Any, tokenizer: Any = None) -> dict[str, Any]:
    """Runs the configured GLUE tasks; returns the results dict also written as JSON."""
    started = time.perf_counter()
    workdir = glue_workdir(config)
    tasks = [get_task(name) for name in parse_task_list(config.tasks)]
    tokenizer_file = tokenizer_file_for(config) if tokenizer is None else None
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer_for(config)
    check_tokenizer(tokenizer)
    pretrained, encoder_config, start_description = load_start_point(config)
    encoder_config = encoder_config.replace(
        dtype=config.dtype, attention_implementation=config.attention_implementation)
    if tokenizer.get_vocab_size() > encoder_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                         f"vocab_size is {encoder_config.vocab_size}; use the pretraining "
                         f"tokenizer")
    results_path = config.results_json or os.path.join(workdir, "glue_results.json")

    names = [t.name for t in tasks]
    dependents = [n for n in config.start_from_mnli if n in names]
    mnli_start = None
    if dependents and "mnli" not in names:
        if config.mnli_checkpoint:
            mnli_start = load_finetuned(config.mnli_checkpoint)
            log(f"{', '.join(dependents)} start from {config.mnli_checkpoint}")
        else:
            log(f"WARNING: MNLI is not among the tasks and config.mnli_checkpoint is unset, so "
                f"{', '.join(dependents)} start from the {start_description} weights, not "
                f"from MNLI-finetuned ones as the recipe says")

    seeds = {t.name: task_seeds(config, t) for t in tasks}
    mnli_key = ("mnli", seeds["mnli"][0]) if "mnli" in names else None
    jobs = []
    for task in sorted(tasks, key=lambda t: t.name in dependents):  # dependents last
        depends = mnli_key if task.name in dependents and mnli_key else None
        jobs += [Job((task.name, seed), depends) for seed in seeds[task.name]]

    devices = jax.local_devices()
    if config.parallel_tasks and len(devices) > 1:
        device_sets = [[d] for d in devices]
        mode = f"in parallel, one job per device ({len(devices)} devices)"
    else:
        device_sets = [devices]
        mode = f"one after another on {len(devices)} device(s)"
    log(f"{len(jobs)} jobs ({', '.join(names)}) {mode}; {start_description}; "
        f"compute dtype {encoder_config.dtype.__name__}")

    data = TaskData(config, tokenizer)
    task_results: dict[str, dict[str, Any]] = {}
    results_lock = threading.Lock()
    done_count = [0]

    def summary() -> dict[str, Any]:
        ordered = {n: task_results[n] for n in names if n in task_results}
        complete = {n: r for n, r in ordered.items() if "score" in r}
        return {
            "glue_average": report.glue_average(complete) if complete else None,
            "num_tasks": len(complete), "tasks": ordered,
            "start": start_description, "devices": [str(d) for d in devices],
            "mode": mode, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - started,
            "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        }

    def run_one(job: Job, job_devices, results: dict) -> FinetuneResult:
        task_name, seed = job.key
        task = get_task(task_name)
        train, evals = data.get(task)
        if job.depends_on is not None:
            init_from, init = results[job.depends_on].params, "mnli"
        elif task_name in dependents and mnli_start is not None:
            init_from, init = mnli_start, "mnli_checkpoint"
        else:
            init_from, init = pretrained, "pretrained" if pretrained is not None else "random"
        prefix = f"{task_name} seed={seed}"
        log(f"{prefix}: start from {init} on {', '.join(str(d) for d in job_devices)}")
        task_config = encoder_config.replace(num_labels=task.num_labels)
        metrics_log = MetricsLog(os.path.join(workdir, "logs", task_name, f"seed_{seed}"))
        try:
            result = finetune(task, train, evals, task_config, init_from, config, seed,
                              job_devices, log=lambda m: log(f"{prefix}: {m}"),
                              keep_params=job.key == mnli_key, metrics_log=metrics_log)
        finally:
            metrics_log.close()
        if job.key == mnli_key and config.save_mnli_checkpoint:
            path = os.path.join(workdir, f"mnli_finetuned_seed{seed}")
            save_finetuned(path, result.params, task_config, tokenizer_file)
            log(f"{prefix}: saved the fine-tuned MNLI weights to {path}")
        if config.write_predictions:
            for stem, (preds, labels) in result.predictions.items():
                report.write_predictions(os.path.join(
                    workdir, "predictions", task_name, f"seed_{seed}", f"{stem}.tsv"),
                    preds, labels)
        with results_lock:
            entry = task_results.setdefault(task_name, {
                "seeds": seeds[task_name], "init": init, "per_seed": {}, "history": {},
                "steps": result.steps, "train_seconds": {}, **_data_summary(train, evals)})
            entry["per_seed"][seed] = result.metrics
            entry["history"][seed] = result.history
            entry["train_seconds"][seed] = result.train_seconds
            if len(entry["per_seed"]) == len(seeds[task_name]):
                ordered = {s: entry["per_seed"][s] for s in seeds[task_name]}
                entry["per_seed"] = ordered
                entry["metrics"] = report.median_over_seeds(ordered)
                entry["score"] = report.task_score(entry["metrics"])
            done_count[0] += 1
            log(f"{prefix}: done in {result.train_seconds:.1f}s ({done_count[0]}/{len(jobs)} "
                f"jobs) " + " ".join(f"{k} {100 * v:.2f}" for k, v in result.metrics.items()))
            report.write_json(results_path, summary())
        return result

    run_jobs(jobs, device_sets, run_one)
    results = summary()
    report.write_json(results_path, results)
    table = report.format_table(results["tasks"])
    with _PRINT_LOCK:
        print("\n" + table + f"\nresults: {results_path}", flush=True)
        sys.stdout.flush()
    return results
