"""The jitted MLM train and eval steps: sparse head, fp32 loss, microbatch accumulation.

The state is a plain dict {"step", "params", "opt_state"} so it saves with Orbax as is; with
model.config.fp8 it also holds "fp8", the FP8 scaling stats (mosaicbert_jax/fp8.py) stacked one
row per tensor ({"scale", "amax_history"}, replicated), whose "gradients" in the step are the
amaxes each tensor saw.
A step whose loss or gradient norm is not finite returns the state it was given, unchanged,
with metrics["finite"] = 0 and metrics["nonfinite_step"] = that step's number, so the training
loop can stop before anything of that step reaches a checkpoint.
The loss is summed over the masked slots of the whole global batch and divided once by their
count, so accumulating over microbatches gives exactly the full-batch gradient; it is
fused/mlm_loss.py's, on the decoder logits with the decoder bias apart.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from mosaicbert_jax import fp8
from mosaicbert_jax.fused import mlm_loss
from mosaicbert_jax.fused.mlm_loss import masked_lm_sums  # noqa: F401 (the steps' loss)
from mosaicbert_jax.model import MosaicBertForMaskedLM
from mosaicbert_jax.sharding import batch_sharding, tree_shardings

Batch = Mapping[str, jax.Array]
BATCH_KEYS = ("input_ids", "segment_ids", "masked_positions", "masked_weights", "masked_labels")
SUM_KEYS = ("loss_sum", "correct_sum", "weight_sum")


def _init_variables(model: MosaicBertForMaskedLM, seed: int) -> dict:
    ids = jnp.ones((1, 8), jnp.int32)
    return model.init(jax.random.key(seed), ids, jnp.ones_like(ids))


def fp8_stat_rows(model: MosaicBertForMaskedLM) -> fp8.StatRows:
    """The rows of the model's stacked FP8 stats (fp8.stat_rows of its STATS collection)."""
    shapes = jax.eval_shape(lambda: _init_variables(model, 0))
    return fp8.stat_rows(shapes[fp8.STATS])


def init_state(model: MosaicBertForMaskedLM, tx: optax.GradientTransformation, seed: int,
               mesh: Mesh) -> tuple[dict, Any]:
    """Initialises params and optimizer state (and FP8 stats when model.config.fp8, stacked:
    fp8.stack_stats) directly in their shardings on the mesh."""
    def init_fn():
        variables = _init_variables(model, seed)
        params = variables["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        if model.config.fp8:
            stats = variables[fp8.STATS]
            state["fp8"] = fp8.stack_stats(stats, fp8.stat_rows(stats))
        return state

    abstract = jax.eval_shape(init_fn)
    shardings = tree_shardings(abstract, mesh)
    if "fp8" in abstract:  # small, read by every layer: replicated
        replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings["fp8"] = jax.tree_util.tree_map(lambda _: replicated, abstract["fp8"])
    return jax.jit(init_fn, out_shardings=shardings)(), shardings


def global_norm(tree: Any, small: int = 1 << 16) -> jax.Array:
    """L2 norm over all leaves, in float32.

    Leaves of at most `small` elements (biases, LayerNorm scales: about 90 of BERT-base's 140)
    are stacked by shape and reduced together, one reduction kernel per shape instead of one
    per leaf. Same-shape leaves mostly share their sharding, so the stack moves no data; where
    they do not, XLA reshards those few small vectors."""
    squares, by_shape = [], {}
    for x in jax.tree_util.tree_leaves(tree):
        if x.size <= small:
            by_shape.setdefault(x.shape, []).append(x)
        else:
            squares.append(jnp.sum(jnp.square(x.astype(jnp.float32))))
    for group in by_shape.values():
        squares.append(jnp.sum(jnp.square(jnp.stack(group).astype(jnp.float32))))
    return jnp.sqrt(sum(squares))


def _split_microbatches(batch: Batch, count: int, mesh: Mesh) -> Batch:
    """[B, ...] -> [count, B/count, ...], taking rows strided so every device keeps its share."""
    def split(x):
        x = x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, ("data", "fsdp"))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return {k: split(batch[k]) for k in BATCH_KEYS}


def make_train_step(model: MosaicBertForMaskedLM, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, state_shardings: Any,
                    microbatches: int = 1, dropout_seed: int = 0) -> Callable:
    """Returns jitted step(state, batch) -> (state, metrics); state is donated.

    A non-finite loss or gradient norm keeps the input state (see the module docstring).
    With FP8 the stats' "gradients" are the amaxes seen: microbatches combine them by max
    (fp8.combine_microbatch_stats), and they never reach the gradient norm or the optimizer."""
    dropout_key = jax.random.key(dropout_seed)
    rows = fp8_stat_rows(model) if model.config.fp8 else ()

    loss_impl = _loss_implementation(model)

    def sums_fn(params, fp8_stats, micro, rng):
        logits, bias = model.apply(_variables(params, fp8_stats), micro["input_ids"],
                                   micro["segment_ids"],
                                   masked_positions=micro["masked_positions"],
                                   deterministic=False, rngs={"dropout": rng}, bias_apart=True)
        sums = mlm_loss.masked_lm_sums(logits, micro["masked_labels"], micro["masked_weights"],
                                       bias, loss_impl)
        return sums["loss_sum"], sums

    def grad_fn(params, fp8_stats, micro, rng):
        """(param gradients, amaxes seen per stats row or None), sums."""
        (grads, seen), sums = jax.grad(sums_fn, argnums=(0, 1), has_aux=True)(
            params, fp8_stats, micro, rng)
        return (grads, None if seen is None else fp8.stack_seen(seen, rows)), sums

    def step(state, batch):
        params = state["params"]
        fp8_stats = None if "fp8" not in state else fp8.model_stats(state["fp8"], rows)
        rng = jax.random.fold_in(dropout_key, state["step"])
        if microbatches == 1:
            (grads, seen), sums = grad_fn(params, fp8_stats, batch, rng)
        else:
            if batch["masked_positions"].shape[0] != batch["input_ids"].shape[0]:
                raise ValueError("microbatches > 1 need masked_positions per row ([batch, k]); "
                                 f"got {batch['masked_positions'].shape[0]} groups for "
                                 f"{batch['input_ids'].shape[0]} rows")
            micro = _split_microbatches(batch, microbatches, mesh)

            def body(carry, inputs):
                index, mb = inputs
                (g, f), s = grad_fn(params, fp8_stats, mb, jax.random.fold_in(rng, index))
                grads_sum, seen_so_far, sums_sum = carry
                return (jax.tree_util.tree_map(jnp.add, grads_sum, g),
                        fp8.combine_microbatch_stats(seen_so_far, f),
                        jax.tree_util.tree_map(jnp.add, sums_sum, s)), None

            zero_sums = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
            no_amax = None if fp8_stats is None else jnp.zeros((len(rows),), jnp.float32)
            zeros = (jax.tree_util.tree_map(jnp.zeros_like, params), no_amax, zero_sums)
            (grads, seen, sums), _ = jax.lax.scan(body, zeros,
                                                     (jnp.arange(microbatches), micro))
        denom = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        if fp8_stats is not None:
            new_state["fp8"] = fp8.updated_stacked(state["fp8"], seen, rows)
        loss, grad_norm = sums["loss_sum"] / denom, global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                           new_state, state)
        metrics = {"loss": loss, "accuracy": sums["correct_sum"] / denom,
                   "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "masked_tokens": sums["weight_sum"], "finite": finite.astype(jnp.float32),
                   "nonfinite_step": jnp.where(finite, 0, state["step"] + 1)}
        return new_state, metrics

    data = batch_sharding(mesh)
    return jax.jit(step, in_shardings=(state_shardings, {k: data for k in BATCH_KEYS}),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


@jax.jit
def first_nonfinite(seen: jax.Array, metrics: dict) -> jax.Array:
    """The first non-finite step so far (0: none), kept on the device: fetched only before a
    checkpoint and at log steps, so checking every step costs no host round trip."""
    return jnp.where(seen > 0, seen, metrics["nonfinite_step"])


def _loss_implementation(model: MosaicBertForMaskedLM) -> str:
    """model.config.mlm_loss_implementation resolved for its vocab (fused/mlm_loss.py)."""
    cfg = model.config
    return mlm_loss.resolve(cfg.mlm_loss_implementation, cfg.vocab_size)


def _variables(params: Any, fp8_stats: Any) -> dict:
    """The model's variables: params, and the FP8 stats when there are any."""
    return {"params": params} if fp8_stats is None else {"params": params, fp8.STATS: fp8_stats}


def make_eval_step(model: MosaicBertForMaskedLM, mesh: Mesh, params_shardings: Any,
                   fp8_shardings: Any = None) -> Callable:
    """Returns eval(params, batch, fp8_stats=None) -> sums of loss, correct and valid slots;
    pass state.get("fp8") so an FP8 model evaluates with its current scales (not updated)."""
    rows = fp8_stat_rows(model) if model.config.fp8 else ()

    loss_impl = _loss_implementation(model)

    def step(params, batch, fp8_stats):
        if fp8_stats is not None:
            fp8_stats = fp8.model_stats(fp8_stats, rows)
        logits, bias = model.apply(_variables(params, fp8_stats), batch["input_ids"],
                                   batch["segment_ids"],
                                   masked_positions=batch["masked_positions"],
                                   deterministic=True, bias_apart=True)
        return mlm_loss.masked_lm_sums(logits, batch["masked_labels"], batch["masked_weights"],
                                       bias, loss_impl)

    data = batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(params_shardings, {k: data for k in BATCH_KEYS},
                                         fp8_shardings))

    def eval_step(params: Any, batch: Batch, fp8_stats: Any = None) -> dict:
        return jitted(params, batch, fp8_stats)
    return eval_step
