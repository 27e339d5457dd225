"""MLM pretraining: `python -m mosaicbert_jax.train --config=configs/base.py --workdir=DIR`.

Builds the mesh, the model and the recipe's optimizer from an ml_collections config, resumes
from the newest checkpoint in --workdir, trains with periodic eval, logging and async
checkpoints, and prints a summary. Every config key can be overridden on the command line,
e.g. --config.train.steps=1000 --config.optimizer.lr=1e-3.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from mosaicbert_jax import fp8
from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.checkpoint import config_to_dict
from mosaicbert_jax.data.training_data import make_training_data
from mosaicbert_jax.model import MosaicBertForMaskedLM, count_params
from mosaicbert_jax.optim import recipe_optimizer
from mosaicbert_jax.sharding import batch_sharding, data_parallel_size, make_mesh
from mosaicbert_jax.training.resume import TrainCheckpoints
from mosaicbert_jax.training.defaults import validate_config
from mosaicbert_jax.training.init_from import apply_init_from
from mosaicbert_jax.training.flops import peak_tflops, training_flops_per_token
from mosaicbert_jax.training.metrics_log import MetricsLog, format_duration
from mosaicbert_jax.training.resume_checks import (already_trained_message, check_same_fp8,
                                                   check_same_model, check_steps,
                                                   schedule_change_message, train_config_item)
from mosaicbert_jax.training.multihost import (check_same_on_every_process, exit_on_error,
                                               maybe_initialize_distributed,
                                               start_error_watcher, stop_error_watcher)
from mosaicbert_jax.training.step import (BATCH_KEYS, first_nonfinite, fp8_stat_rows,
                                          init_state, make_eval_step, make_train_step)
from mosaicbert_jax.cli_errors import UserError, run_absl_app
from mosaicbert_jax.xla_flags import apply_gpu_defaults


def copy_data_tokenizer(tokenizer_file: str, workdir: str) -> None:
    """Keeps the data's tokenizer.json in the workdir, where fill-mask, convert and GLUE look."""
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(tokenizer_file, os.path.join(workdir, "tokenizer.json"))


def config_digest(config: ml_collections.ConfigDict) -> str:
    """A short hash of every config value, to check that all processes run the same config."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int) -> MosaicBertConfig:
    """The model of config.model, with the vocab size the data calls for."""
    overrides: dict[str, Any] = dict(
        dtype=config.model.dtype, attention_implementation=config.model.attention_implementation,
        remat=config.model.remat, hidden_dropout_prob=config.model.hidden_dropout_prob,
        dropout_rng=config.model.dropout_rng, vocab_size=vocab_size,
        glu_implementation=config.model.glu_implementation,
        layernorm_implementation=config.model.layernorm_implementation,
        mlm_loss_implementation=config.model.get("mlm_loss_implementation", "auto"),
        attention_window=config.model.attention_window,
        global_attention_every=config.model.global_attention_every,
        fp8=config.model.fp8, fp8_amax_history=config.model.fp8_amax_history,
        fp8_gemm=config.model.fp8_gemm,
        fp8_qkv_grad_in_attention=config.model.get("fp8_qkv_grad_in_attention", True))
    fp8.check_hardware(config.model.fp8)
    return MosaicBertConfig.from_preset(config.model.preset, **overrides)


def check_batch_layout(global_batch: int, microbatches: int, dp_size: int,
                       process_count: int) -> None:
    """Clear errors, before anything compiles, for batch sizes the mesh cannot split."""
    if global_batch <= 0 or microbatches <= 0:
        raise ValueError(f"global_batch_size={global_batch} and microbatches={microbatches} "
                         f"must be positive")
    if global_batch % process_count:
        raise ValueError(f"global_batch_size={global_batch} is not divisible by the "
                         f"{process_count} processes")
    if global_batch % (dp_size * microbatches):
        raise ValueError(
            f"global_batch_size={global_batch} is not divisible by data-parallel size "
            f"{dp_size} x microbatches {microbatches} = {dp_size * microbatches}; choose a "
            f"multiple of {dp_size * microbatches}")


def _to_global(batch: dict, sharding, global_batch: int) -> dict:
    return {k: jax.make_array_from_process_local_data(
        sharding, batch[k], (global_batch,) + batch[k].shape[1:]) for k in BATCH_KEYS}


class NonFiniteError(UserError):
    """The loss or gradient norm of a step was NaN or Inf; nothing of that step was saved."""


def check_finite(seen_nonfinite: jax.Array, metrics: dict, ckpt: TrainCheckpoints,
                 workdir: str) -> None:
    """Raises NonFiniteError if any step so far was non-finite (one scalar fetched), after
    letting the saves in flight, all from finite states, finish."""
    bad_step = int(jax.device_get(seen_nonfinite))
    if not bad_step:
        return
    ckpt.close()
    last_good = ckpt.latest_step()
    kept = (f"the last good checkpoint, step {last_good}, is kept in {ckpt.directory}"
            if last_good else "no checkpoint was written")
    values = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")})
    latest = (f" (at the latest step: loss {float(values['loss']):.4g}, grad_norm "
              f"{float(values['grad_norm']):.4g})")
    raise NonFiniteError(
        f"non-finite loss or gradient norm at step {bad_step}{latest}; the run stopped before "
        f"saving anything of that step and {kept}. Lower --config.optimizer.lr or set "
        f"--config.optimizer.clip_norm, then run again with --workdir={workdir} to resume "
        f"from the last good checkpoint")


def evaluate(eval_step, state, eval_iter, initial_state: dict, num_batches: int, sharding,
             global_batch: int) -> dict:
    """MLM loss and accuracy over the same `num_batches` held-out batches every time."""
    eval_iter.set_state(initial_state)
    totals = None
    for _ in range(num_batches):
        sums = eval_step(state["params"], _to_global(next(eval_iter), sharding, global_batch),
                         state.get("fp8"))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    denom = max(float(totals["weight_sum"]), 1.0)
    return {"loss": float(totals["loss_sum"]) / denom,
            "accuracy": float(totals["correct_sum"]) / denom}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: Optional[int] = None) -> dict:
    """Runs (or resumes) pretraining in `workdir`; returns the final summary and state.

    `stop_after` ends the run early at that step, after its checkpoint, as a job that is
    preempted there would (the schedule still spans train.steps).
    """
    validate_config(config)
    maybe_initialize_distributed(config.train.distributed)
    check_same_on_every_process("the config", config_digest(config),
                                "start every process with the same command line")
    tc = config.train
    mesh = make_mesh(dict(config.mesh))
    dp_size = data_parallel_size(mesh)
    process_count, process_index = jax.process_count(), jax.process_index()
    check_batch_layout(tc.global_batch_size, tc.microbatches, dp_size, process_count)
    if tc.steps <= 0:
        raise ValueError(f"train.steps={tc.steps} must be positive")
    per_process = tc.global_batch_size // process_count
    data = make_training_data(config.data, per_process, tc.seed, process_index, process_count,
                              config.model.vocab_size)
    train_iter, eval_iter = data.train, data.eval
    model_cfg = model_config_from(config, data.vocab_size)
    if process_index == 0 and data.tokenizer_file:
        copy_data_tokenizer(data.tokenizer_file, workdir)

    # What could differ between processes is checked, and the data position restored, before
    # the first collective, so a mismatch is one error on every process instead of a hang.
    ckpt = TrainCheckpoints(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    start = ckpt.latest_step() or 0
    check_same_on_every_process(
        "the checkpoint to resume", f"step {start}" if start else "none",
        f"--workdir={workdir} must be one directory that every process sees")
    schedule_note = None
    if start:
        saved_model = ckpt.restore_model_config(start)
        check_same_model(saved_model, config_to_dict(model_cfg), config.model.preset, start,
                         workdir)
        check_same_fp8(saved_model, config_to_dict(model_cfg), start, workdir)
        check_steps(start, tc.steps, workdir)
        if start == tc.steps:
            ckpt.close()
            if process_index == 0:
                print(already_trained_message(start, workdir), flush=True)
            return {"state": None, "steps": start, "resumed_from": start,
                    "already_trained": True, "checkpoints": ckpt.directory}
        schedule_note = schedule_change_message(ckpt.restore_train_config(start), start,
                                                tc.steps, config.optimizer)
        train_iter.set_state(ckpt.restore_data_state(start))

    # Rows a killed run logged after its last checkpoint are logged again by this run.
    log = MetricsLog(workdir, enabled=process_index == 0, resume_step=start if start else -1)
    if schedule_note:
        log.print(schedule_note)
    schedule, tx = recipe_optimizer(config.optimizer, tc.steps)
    model = MosaicBertForMaskedLM(model_cfg)
    state, shardings = init_state(model, tx, tc.seed, mesh)
    state = apply_init_from(config.init_from, state, start, model_cfg, data.tokenizer_file,
                            log.print)  # continued pretraining; ignored once resuming
    n_params = count_params(state["params"])
    if start:
        state = ckpt.restore_state(start, state, shardings,
                                   fp8_stat_rows(model) if model_cfg.fp8 else ())
        log.print(f"resumed from step {start} in {ckpt.directory}")
    eval_initial = eval_iter.get_state()

    train_step = make_train_step(model, tx, schedule, mesh, shardings, tc.microbatches,
                                 dropout_seed=tc.seed)
    eval_step = make_eval_step(model, mesh, shardings["params"], shardings.get("fp8"))
    sharding = batch_sharding(mesh)
    tokens_per_step = tc.global_batch_size * config.data.seq_len
    flops_per_token = training_flops_per_token(model_cfg, config.data.seq_len,
                                               config.data.mask_prob)
    peak = tc.peak_tflops_per_device or peak_tflops(jax.devices()[0])
    log.print(f"MosaicBERT-{config.model.preset}: {n_params:,} parameters, mesh "
              f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
              f"device(s), global batch {tc.global_batch_size} x {config.data.seq_len} tokens, "
              f"steps {start} -> {tc.steps}")

    first_eval = evaluate(eval_step, state, eval_iter, eval_initial,
                          tc.eval_batches, sharding, tc.global_batch_size) if start == 0 else None
    if first_eval:
        log.write("eval", 0, first_eval,
                  f"eval step 0: loss {first_eval['loss']:.4f} acc {first_eval['accuracy']:.4f}")

    last_eval = first_eval
    window_start, window_steps = time.perf_counter(), 0
    run_start, metrics = time.perf_counter(), None
    last_step = min(tc.steps, stop_after or tc.steps)
    seen_nonfinite = jnp.zeros((), jnp.int32)  # first non-finite step (0: none), on device
    for step in range(start + 1, last_step + 1):
        batch = _to_global(next(train_iter), sharding, tc.global_batch_size)
        state, metrics = train_step(state, batch)
        seen_nonfinite = first_nonfinite(seen_nonfinite, metrics)
        window_steps += 1
        is_log_step = step % tc.log_every == 0 or step == tc.steps
        is_eval_step = step % tc.eval_every == 0 or step == tc.steps
        is_save_step = step % tc.checkpoint_every == 0 or step == last_step
        if is_log_step or is_eval_step or is_save_step:
            check_finite(seen_nonfinite, metrics, ckpt, workdir)
        if is_log_step:
            values = jax.device_get(metrics)
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            values = {k: float(v) for k, v in values.items() if k not in ("finite",
                                                                           "nonfinite_step")}
            values["tokens_per_s"] = tokens_per_s
            mfu_text = ""
            if peak:
                values["mfu"] = tokens_per_s * flops_per_token / (peak * 1e12 *
                                                                  jax.device_count())
                mfu_text = f" mfu {values['mfu']:.1%}"
            eta = (tc.steps - step) * elapsed / window_steps
            log.write("train", step, values,
                      f"step {step}/{tc.steps}: loss {values['loss']:.4f} acc "
                      f"{values['accuracy']:.4f} lr {values['lr']:.2e} grad_norm "
                      f"{values['grad_norm']:.3f} {tokens_per_s:,.0f} tok/s{mfu_text} "
                      f"eta {format_duration(eta)}")
            window_start, window_steps = time.perf_counter(), 0
        if is_eval_step:
            eval_start = time.perf_counter()
            last_eval = evaluate(eval_step, state, eval_iter, eval_initial,
                                 tc.eval_batches, sharding, tc.global_batch_size)
            log.write("eval", step, last_eval, f"eval step {step}: loss "
                      f"{last_eval['loss']:.4f} acc {last_eval['accuracy']:.4f}")
            window_start += time.perf_counter() - eval_start  # eval time is not train time
        if is_save_step:
            # The same on every process by construction; process 0's copy is written.
            ckpt.save(step, state, train_iter.get_state(), config_to_dict(model_cfg),
                      train_config_item(config))
    ckpt.close()
    summary = {"steps": last_step, "resumed_from": start, "params": n_params,
               "wall_s": time.perf_counter() - run_start,
               "first_eval_loss": first_eval["loss"] if first_eval else None,
               "final_eval_loss": last_eval["loss"] if last_eval else None,
               "final_eval_accuracy": last_eval["accuracy"] if last_eval else None,
               "checkpoints": ckpt.directory}
    log.print("summary: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()))
    log.close()
    return {"state": state, **summary}


def main(argv: Optional[list[str]] = None) -> None:
    from absl import flags, logging
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and TensorBoard.")
    flags.DEFINE_integer("stop_after", None, "End after this step's checkpoint, as a job "
                         "preempted there would (the schedule still spans train.steps).")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_):
        apply_gpu_defaults()  # before the first computation initialises the backend
        if not flags.FLAGS["verbosity"].present:  # keep Orbax's INFO chatter off the console
            logging.set_verbosity(logging.WARNING)
        config = flags.FLAGS.config
        try:
            maybe_initialize_distributed(config.train.distributed)
            start_error_watcher()
            train_and_evaluate(config, os.path.expanduser(flags.FLAGS.workdir),
                               stop_after=flags.FLAGS.stop_after)
        except (Exception, KeyboardInterrupt) as error:
            exit_on_error(error)  # every process ends, none waits in the shutdown barrier
        stop_error_watcher()

    run_absl_app(run, argv)  # a bad --config.KEY override is one error line


if __name__ == "__main__":
    main()
