"""Fine-tunes and evaluates one GLUE task for one seed on one device set (data parallel).

Recipe: decoupled AdamW, linear warmup over 6% of the steps then linear decay to 0,
bf16 compute with fp32 master weights (the model config's dtype / param_dtype),
cross-entropy for classification and MSE on the single logit for regression (STS-B).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
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

Params = Any
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class FinetuneHparams:
    """Optimisation and batching settings of one task (see configs/glue.py)."""

    learning_rate: float
    weight_decay: float
    epochs: int
    batch_size: int
    eval_batch_size: int = 128
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    warmup_fraction: float = 0.06
    clip_norm: Optional[float] = None
    max_seq_len: int = 256
    bucket_lengths: tuple[int, ...] = (32, 64, 128, 256)
    group_by_length: bool = True
    log_every_steps: int = 100
    eval_every_epoch: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "max_seq_len",
                     "log_every_steps"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive")


@dataclasses.dataclass
class FinetuneResult:
    """Final metrics (after the last epoch), per-epoch history and the final predictions."""

    metrics: dict[str, float]
    history: list[dict[str, Any]]
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]  # split stem -> (preds, labels)
    steps: int
    train_seconds: float
    params: Optional[Params] = None


def make_mesh(devices: Sequence[Any], *batch_sizes: int) -> Mesh:
    """A 1-D 'data' mesh over the largest prefix of devices that divides every batch size."""
    count = len(devices)
    while count > 1 and any(b % count for b in batch_sizes):
        count -= 1
    return Mesh(np.asarray(list(devices)[:count]), ("data",))


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def graft(params: Params, source: Params, names: Sequence[str]) -> Params:
    """params with the named top-level subtrees replaced by source's (shapes must match)."""
    params = dict(params)
    for name in names:
        target_leaves = jax.tree_util.tree_leaves_with_path(params[name])
        source_leaves = dict((_path_name(p), v)
                             for p, v in jax.tree_util.tree_leaves_with_path(source[name]))
        for path, leaf in target_leaves:
            key = f"{name}/{_path_name(path)}"
            if _path_name(path) not in source_leaves:
                raise ValueError(f"the starting checkpoint lacks parameter {key}; it does not "
                                 f"match this model config")
            got = np.shape(source_leaves[_path_name(path)])
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


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree_util.tree_leaves(tree)))


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
        return params, opt_state, {"loss": loss, "grad_norm": _global_norm(grads),
                                   "lr": schedule(step_index)}

    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(tx.init)


@functools.lru_cache(maxsize=64)
def _eval_step(model_config: MosaicBertConfig) -> Callable:
    model = MosaicBertForSequenceClassification(model_config)

    def logits_fn(params, batch):
        return model.apply({"params": params}, batch["input_ids"], batch["segment_ids"],
                           batch["token_type_ids"], deterministic=True)

    return jax.jit(logits_fn)


def predict(model_config: MosaicBertConfig, params: Params, split: EncodedSplit,
            hp: FinetuneHparams, mesh: Mesh, regression: bool) -> np.ndarray:
    """Class ids (argmax) or regression scores for every example of split, in order."""
    buckets = batching.make_buckets(hp.max_seq_len, hp.bucket_lengths)
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    eval_step = _eval_step(model_config)
    predictions = np.zeros(len(split), np.float32 if regression else np.int32)
    for plan in batching.eval_plan(split.lengths, buckets, hp.eval_batch_size):
        batch = batching.collate(split, plan, hp.eval_batch_size)
        batch.pop("labels"), batch.pop("weights")
        logits = np.asarray(eval_step(params, jax.device_put(batch, data_sharding)))
        rows = len(plan.indices)
        predictions[plan.indices] = (logits[:rows, 0] if regression
                                     else np.argmax(logits[:rows], axis=-1))
    return predictions


def evaluate(task: GlueTask, model_config: MosaicBertConfig, params: Params,
             evals: dict[str, EncodedSplit], hp: FinetuneHparams, mesh: Mesh
             ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """GLUE metrics over the task's eval splits (MNLI: matched_ and mismatched_ prefixes)."""
    metrics, predictions = {}, {}
    for split in task.eval_splits:
        data = evals[split.tsv_stem]
        preds = predict(model_config, params, data, hp, mesh, task.is_regression)
        predictions[split.tsv_stem] = (preds, data.labels)
        for name, value in compute_metrics(task.metrics, preds, data.labels).items():
            metrics[split.metric_prefix + name] = value
    return metrics, predictions


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())


def finetune(task: GlueTask, train: EncodedSplit, evals: dict[str, EncodedSplit],
             model_config: MosaicBertConfig, init_from: Optional[Params], hp: FinetuneHparams,
             seed: int, devices: Sequence[Any], log: Log = print,
             keep_params: bool = False) -> FinetuneResult:
    """Trains on train for hp.epochs epochs, evaluates (each epoch and at the end)."""
    if model_config.num_labels != task.num_labels:
        raise ValueError(f"model_config.num_labels={model_config.num_labels} but {task.name} "
                         f"has {task.num_labels}; use model_config.replace(num_labels=...)")
    if len(train) == 0:
        raise ValueError(f"{task.name}: the training split {train.source} has no examples")
    mesh = make_mesh(devices, hp.batch_size, hp.eval_batch_size)
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    buckets = batching.make_buckets(hp.max_seq_len, hp.bucket_lengths)
    epoch_steps = batching.steps_per_epoch(train.lengths, buckets, hp.batch_size,
                                           hp.group_by_length)
    total_steps = epoch_steps * hp.epochs
    optimizer_key = (hp.learning_rate, hp.weight_decay, hp.b1, hp.b2, hp.eps,
                     hp.warmup_fraction, hp.clip_norm, total_steps)
    train_step, optimizer_init = _train_step(model_config, task.is_regression, optimizer_key)

    params = initial_params(model_config, init_from, seed, mesh)
    opt_state = optimizer_init(params)
    dropout_key = jax.random.fold_in(jax.random.key(seed), 1)
    order_rng = np.random.default_rng(seed)
    log(f"{len(train)} train examples, {total_steps} steps ({hp.epochs} epochs x "
        f"{epoch_steps}), batch {hp.batch_size} on {mesh.devices.size} device(s), "
        f"lr {hp.learning_rate:g}, buckets {buckets}")

    history, step, start = [], 0, time.perf_counter()
    window = dict(losses=[], examples=0, tokens=0, padded=0, time=time.perf_counter())
    for epoch in range(1, hp.epochs + 1):
        for plan in batching.train_plan(train.lengths, buckets, hp.batch_size, order_rng,
                                        hp.group_by_length):
            batch = batching.collate(train, plan, hp.batch_size)
            window["examples"] += len(plan.indices)
            window["tokens"] += int(batch["segment_ids"].sum())
            window["padded"] += batch["segment_ids"].size
            params, opt_state, stats = train_step(params, opt_state,
                                                  jax.device_put(batch, data_sharding),
                                                  dropout_key, np.int32(step))
            window["losses"].append(stats["loss"])
            step += 1
            if step % hp.log_every_steps == 0 or step == total_steps:
                elapsed = max(time.perf_counter() - window["time"], 1e-9)
                loss = float(np.mean(jax.device_get(window["losses"])))
                log(f"step {step}/{total_steps} epoch {epoch} loss {loss:.4f} "
                    f"lr {float(stats['lr']):.3g} grad_norm {float(stats['grad_norm']):.3f} "
                    f"{window['examples'] / elapsed:.1f} ex/s "
                    f"{window['tokens'] / elapsed:.0f} tok/s "
                    f"(padding {100 * (1 - window['tokens'] / window['padded']):.0f}%)")
                window = dict(losses=[], examples=0, tokens=0, padded=0,
                              time=time.perf_counter())
        if hp.eval_every_epoch or epoch == hp.epochs:
            eval_start = time.perf_counter()
            metrics, predictions = evaluate(task, model_config, params, evals, hp, mesh)
            history.append({"epoch": epoch, "step": step, **metrics})
            log(f"eval epoch {epoch} step {step}: {_format_metrics(metrics)}")
            window["time"] += time.perf_counter() - eval_start  # throughput: training only
    train_seconds = time.perf_counter() - start
    return FinetuneResult(metrics, history, predictions, step, train_seconds,
                          params if keep_params else None)
