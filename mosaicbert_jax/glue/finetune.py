"""Fine-tunes and evaluates one GLUE task for one seed on one device set (data parallel).

Recipe: decoupled AdamW, linear warmup over 6% of the steps then linear decay to 0,
bf16 compute with fp32 master weights (the model config's dtype / param_dtype),
cross-entropy for classification and MSE on the single logit for regression (STS-B).
Settings come straight from the GLUE config (configs/glue.py): the task's `per_task` entry and
the shared keys. The mesh, gradient norm and metrics log are pretraining's own.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.glue import batching
from mosaicbert_jax.glue.data import EncodedSplit
from mosaicbert_jax.glue.metrics import compute_metrics
from mosaicbert_jax.glue.tasks import GlueTask
from mosaicbert_jax.model import MosaicBertForSequenceClassification
from mosaicbert_jax.optim import decoupled_adamw, warmup_linear_decay
from mosaicbert_jax.sharding import batch_sharding, make_mesh, path_name
from mosaicbert_jax.training.metrics_log import MetricsLog
from mosaicbert_jax.training.step import global_norm

Params = Any
Log = Callable[[str], None]


def task_settings(config: ml_collections.ConfigDict, task: GlueTask) -> ml_collections.ConfigDict:
    """config.per_task.<task> (peak lr, decoupled weight decay, epochs, batch size, seeds),
    checked together with the shared batching keys, before anything compiles."""
    if task.name not in config.per_task:
        raise ValueError(f"config.per_task has no entry for {task.name!r}; add "
                         f"learning_rate/weight_decay/epochs/batch_size/seeds for it")
    per = config.per_task[task.name]
    for where, name in ((per, "epochs"), (per, "batch_size"), (config, "eval_batch_size"),
                        (config, "max_seq_len"), (config, "log_every_steps")):
        if int(where[name]) <= 0:
            prefix = f"per_task.{task.name}." if where is per else ""
            raise ValueError(f"config.{prefix}{name}={where[name]} must be a positive integer")
    if per.learning_rate <= 0:
        raise ValueError(f"config.per_task.{task.name}.learning_rate={per.learning_rate} must "
                         f"be positive")
    return per


@dataclasses.dataclass
class FinetuneResult:
    """Final metrics (after the last epoch), per-epoch history and the final predictions."""

    metrics: dict[str, float]
    history: list[dict[str, Any]]
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]  # split stem -> (preds, labels)
    steps: int
    train_seconds: float
    params: Optional[Params] = None


def data_parallel_mesh(devices: Sequence[Any], *batch_sizes: int) -> Mesh:
    """Pretraining's mesh, all 'data', over the largest prefix of devices that divides every
    batch size."""
    count = len(devices)
    while count > 1 and any(b % count for b in batch_sizes):
        count -= 1
    return make_mesh({"data": count, "fsdp": 1, "tensor": 1}, list(devices)[:count])


def graft(params: Params, source: Params, names: Sequence[str]) -> Params:
    """params with the named top-level subtrees replaced by source's (shapes must match)."""
    params = dict(params)
    for name in names:
        target_leaves = jax.tree_util.tree_leaves_with_path(params[name])
        source_leaves = dict((path_name(p), v)
                             for p, v in jax.tree_util.tree_leaves_with_path(source[name]))
        for path, leaf in target_leaves:
            key = f"{name}/{path_name(path)}"
            if path_name(path) not in source_leaves:
                raise ValueError(f"the starting checkpoint lacks parameter {key}; it does not "
                                 f"match this model config")
            got = np.shape(source_leaves[path_name(path)])
            if got != leaf.shape:
                raise ValueError(f"starting checkpoint parameter {key} has shape {got}, the "
                                 f"model expects {leaf.shape}; check the config matches it")
        if len(source_leaves) != len(target_leaves):
            raise ValueError(f"the starting checkpoint's {name!r} has {len(source_leaves)} "
                             f"tensors, the model {len(target_leaves)}; configs differ")
        # A copy, never an alias: training donates its params, and the source (the MNLI
        # weights) must outlive every job that starts from it. Host arrays stay on the host
        # until the caller places them.
        params[name] = jax.tree_util.tree_map(
            lambda t, s: np.array(s, t.dtype) if isinstance(s, np.ndarray)
            else jnp.array(s, t.dtype, copy=True), params[name], source[name])
    return params


@functools.lru_cache(maxsize=64)
def _init_fn(model_config: MosaicBertConfig, sharding: NamedSharding) -> Callable:
    """Jitted random init (cached: every seed of a task reuses the compiled program)."""
    model = MosaicBertForSequenceClassification(model_config)

    def init(key):
        ids = jnp.zeros((1, 8), jnp.int32)
        return model.init({"params": key}, ids, jnp.ones_like(ids), ids,
                          deterministic=True)["params"]

    return jax.jit(init, out_shardings=sharding)


def initial_params(model_config: MosaicBertConfig, init_from: Optional[Params], seed: int,
                   mesh: Mesh) -> Params:
    """Fresh params, with 'bert' (and 'pooler_dense' if present) taken from init_from.

    The classifier is always new: its size depends on the task (the MNLI head has 3 labels).
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    params = _init_fn(model_config, replicated)(jax.random.key(seed))
    if init_from is None:
        return params
    if "bert" not in init_from:
        raise ValueError(f"starting params have keys {sorted(init_from)}; expected a 'bert' "
                         f"subtree (MLM checkpoint or fine-tuned classifier)")
    names = ["bert"] + (["pooler_dense"] if "pooler_dense" in init_from else [])
    return jax.device_put(graft(params, init_from, names), replicated)


def _per_example_loss(logits: jax.Array, labels: jax.Array, regression: bool) -> jax.Array:
    if regression:
        return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@functools.lru_cache(maxsize=64)
def _train_step(model_config: MosaicBertConfig, regression: bool,
                optimizer_key: tuple) -> tuple[Callable, Callable]:
    """Jitted (train step, optimizer init), cached so seeds of one task share the programs."""
    (learning_rate, weight_decay, b1, b2, eps, warmup_fraction, clip_norm,
     total_steps) = optimizer_key
    schedule = warmup_linear_decay(learning_rate, total_steps, warmup_fraction, 0.0)
    tx = decoupled_adamw(schedule, learning_rate, b1, b2, eps, weight_decay, clip_norm)
    model = MosaicBertForSequenceClassification(model_config)

    def loss_fn(params, batch, dropout_key):
        logits = model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                             batch["token_type_ids"], deterministic=False,
                             rngs={"dropout": dropout_key})
        per_example = _per_example_loss(logits, batch["labels"], regression)
        weights = batch["weights"]
        return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def step(params, opt_state, batch, dropout_key, step_index):
        key = jax.random.fold_in(dropout_key, step_index)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": global_norm(grads),
                                   "lr": schedule(step_index)}

    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(tx.init)


@functools.lru_cache(maxsize=64)
def _eval_step(model_config: MosaicBertConfig) -> Callable:
    model = MosaicBertForSequenceClassification(model_config)

    def logits_fn(params, batch):
        return model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                           batch["token_type_ids"], deterministic=True)

    return jax.jit(logits_fn)


def _buckets(config: ml_collections.ConfigDict) -> list[int]:
    return batching.make_buckets(int(config.max_seq_len),
                                 tuple(int(b) for b in config.bucket_lengths))


def predict(model_config: MosaicBertConfig, params: Params, split: EncodedSplit,
            config: ml_collections.ConfigDict, mesh: Mesh, regression: bool) -> np.ndarray:
    """Class ids (argmax) or regression scores for every example of split, in order."""
    buckets = _buckets(config)
    data_sharding = batch_sharding(mesh)
    eval_step = _eval_step(model_config)
    eval_batch_size = int(config.eval_batch_size)
    predictions = np.zeros(len(split), np.float32 if regression else np.int32)
    for plan in batching.eval_plan(split.lengths, buckets, eval_batch_size):
        batch = batching.collate(split, plan, eval_batch_size)
        batch.pop("labels"), batch.pop("weights")
        logits = np.asarray(eval_step(params, jax.device_put(batch, data_sharding)))
        rows = len(plan.indices)
        predictions[plan.indices] = (logits[:rows, 0] if regression
                                     else np.argmax(logits[:rows], axis=-1))
    return predictions


def evaluate(task: GlueTask, model_config: MosaicBertConfig, params: Params,
             evals: dict[str, EncodedSplit], config: ml_collections.ConfigDict, mesh: Mesh
             ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """GLUE metrics over the task's eval splits (MNLI: matched_ and mismatched_ prefixes)."""
    metrics, predictions = {}, {}
    for split in task.eval_splits:
        data = evals[split.tsv_stem]
        preds = predict(model_config, params, data, config, mesh, task.is_regression)
        predictions[split.tsv_stem] = (preds, data.labels)
        for name, value in compute_metrics(task.metrics, preds, data.labels).items():
            metrics[split.metric_prefix + name] = value
    return metrics, predictions


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())


def finetune(task: GlueTask, train: EncodedSplit, evals: dict[str, EncodedSplit],
             model_config: MosaicBertConfig, init_from: Optional[Params],
             config: ml_collections.ConfigDict, seed: int, devices: Sequence[Any],
             log: Log = print, keep_params: bool = False,
             metrics_log: Optional[MetricsLog] = None) -> FinetuneResult:
    """Trains on train for the task's epochs, evaluates (each epoch and at the end); records
    go to `metrics_log` (TensorBoard + metrics.jsonl) when given, progress lines to `log`."""
    if model_config.num_labels != task.num_labels:
        raise ValueError(f"model_config.num_labels={model_config.num_labels} but {task.name} "
                         f"has {task.num_labels}; use model_config.replace(num_labels=...)")
    if len(train) == 0:
        raise ValueError(f"{task.name}: the training split {train.source} has no examples")
    per, opt = task_settings(config, task), config.optimizer
    epochs, batch_size = int(per.epochs), int(per.batch_size)
    learning_rate = float(per.learning_rate)
    log_every = int(config.log_every_steps)
    mesh = data_parallel_mesh(devices, batch_size, int(config.eval_batch_size))
    data_sharding = batch_sharding(mesh)
    buckets = _buckets(config)
    group_by_length = bool(config.group_by_length)
    epoch_steps = batching.steps_per_epoch(train.lengths, buckets, batch_size, group_by_length)
    total_steps = epoch_steps * epochs
    optimizer_key = (learning_rate, float(per.weight_decay), float(opt.b1), float(opt.b2),
                     float(opt.eps), float(opt.warmup_fraction),
                     None if opt.clip_norm is None else float(opt.clip_norm), total_steps)
    train_step, optimizer_init = _train_step(model_config, task.is_regression, optimizer_key)

    params = initial_params(model_config, init_from, seed, mesh)
    opt_state = optimizer_init(params)
    dropout_key = jax.random.fold_in(jax.random.key(seed), 1)
    order_rng = np.random.default_rng(seed)
    log(f"{len(train)} train examples, {total_steps} steps ({epochs} epochs x "
        f"{epoch_steps}), batch {batch_size} on {mesh.devices.size} device(s), "
        f"lr {learning_rate:g}, buckets {buckets}")

    history, step, start = [], 0, time.perf_counter()
    window = dict(losses=[], examples=0, tokens=0, padded=0, time=time.perf_counter())
    for epoch in range(1, epochs + 1):
        for plan in batching.train_plan(train.lengths, buckets, batch_size, order_rng,
                                        group_by_length):
            batch = batching.collate(train, plan, batch_size)
            window["examples"] += len(plan.indices)
            window["tokens"] += int(batch["segment_ids"].sum())
            window["padded"] += batch["segment_ids"].size
            params, opt_state, stats = train_step(params, opt_state,
                                                  jax.device_put(batch, data_sharding),
                                                  dropout_key, np.int32(step))
            window["losses"].append(stats["loss"])
            step += 1
            if step % log_every == 0 or step == total_steps:
                elapsed = max(time.perf_counter() - window["time"], 1e-9)
                values = {"loss": float(np.mean(jax.device_get(window["losses"]))),
                          "lr": float(stats["lr"]), "grad_norm": float(stats["grad_norm"]),
                          "examples_per_s": window["examples"] / elapsed,
                          "tokens_per_s": window["tokens"] / elapsed,
                          "padding": 1 - window["tokens"] / window["padded"], "epoch": epoch}
                if metrics_log is not None:
                    metrics_log.write("train", step, values)
                log(f"step {step}/{total_steps} epoch {epoch} loss {values['loss']:.4f} "
                    f"lr {values['lr']:.3g} grad_norm {values['grad_norm']:.3f} "
                    f"{values['examples_per_s']:.1f} ex/s {values['tokens_per_s']:.0f} tok/s "
                    f"(padding {100 * values['padding']:.0f}%)")
                window = dict(losses=[], examples=0, tokens=0, padded=0,
                              time=time.perf_counter())
        if config.eval_every_epoch or epoch == epochs:
            eval_start = time.perf_counter()
            metrics, predictions = evaluate(task, model_config, params, evals, config, mesh)
            history.append({"epoch": epoch, "step": step, **metrics})
            if metrics_log is not None:
                metrics_log.write("eval", step, {**metrics, "epoch": epoch})
            log(f"eval epoch {epoch} step {step}: {_format_metrics(metrics)}")
            window["time"] += time.perf_counter() - eval_start  # throughput: training only
    train_seconds = time.perf_counter() - start
    return FinetuneResult(metrics, history, predictions, step, train_seconds,
                          params if keep_params else None)
