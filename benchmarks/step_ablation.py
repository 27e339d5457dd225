"""Where a MosaicBERT train step's time goes: forward, backward, dropout RNG, optimizer, attention.

  PYTHONPATH=. python benchmarks/step_ablation.py --preset base --seq 128 --batch 256
Each row times one variant (median of 3 x --steps); differences between rows locate the cost.
The model, batch, optimizer and the "full step" row are the trainer's own, built by
train_throughput.build_train_step from the recipe config; the other rows take it apart.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mosaicbert_jax import MosaicBertForMaskedLM, alibi_slopes, attention
from mosaicbert_jax.optim import recipe_optimizer
from mosaicbert_jax.training.step import masked_lm_sums
from mosaicbert_jax.xla_flags import apply_gpu_defaults
from train_throughput import build_train_step, recipe_config


def bench(fn, *args, steps=10):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / steps * 1e3)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="base")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--attention", default="xla")
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    apply_gpu_defaults()  # time what the train command runs
    one_device = {"data": 1, "fsdp": 1, "tensor": 1}
    train_step, state, batches, cfg, _ = build_train_step(
        a.preset, a.seq, a.batch, a.attention, one_device, devices=jax.devices()[:1])
    batch = batches[0]
    recipe = recipe_config(a.preset, a.seq, a.batch, a.attention, one_device)
    _, tx = recipe_optimizer(recipe.optimizer, recipe.train.steps)
    # Copies: the trainer's step donates its state, and the other rows reuse these.
    params = jax.tree_util.tree_map(jnp.copy, state["params"])
    opt_state = jax.tree_util.tree_map(jnp.copy, state["opt_state"])

    hash_model = MosaicBertForMaskedLM(cfg.replace(dropout_rng="hash"))
    threefry_model = MosaicBertForMaskedLM(cfg.replace(dropout_rng="threefry"))

    def loss(p, rng, deterministic, model=hash_model):
        logits = model.apply({"params": p}, batch["input_ids"], batch["segment_ids"],
                             masked_positions=batch["masked_positions"],
                             deterministic=deterministic, rngs={"dropout": rng})
        s = masked_lm_sums(logits, batch["masked_labels"], batch["masked_weights"])
        return s["loss_sum"] / s["weight_sum"]

    fwd = jax.jit(lambda p, r: loss(p, r, True))
    grad_det = jax.jit(jax.grad(lambda p, r: loss(p, r, True)))
    grad_drop = jax.jit(jax.grad(lambda p, r: loss(p, r, False)))
    grad_threefry = jax.jit(jax.grad(lambda p, r: loss(p, r, False, threefry_model)))

    def full_step():
        nonlocal state
        state, metrics = train_step(state, batch)
        return metrics

    upd = jax.jit(lambda g, o, p: tx.update(g, o, p))
    tkey, rkey = jax.random.key(1), jax.random.key(1, impl="rbg")
    h, d = cfg.num_attention_heads, cfg.head_dim
    q = jax.random.normal(jax.random.key(2), (a.batch, a.seq, h, d), jnp.bfloat16)
    seg = batch["segment_ids"]
    slopes = jnp.asarray(alibi_slopes(h))
    att_f = jax.jit(lambda x: attention(x, x, x, seg, slopes, a.attention))
    att_fb = jax.jit(jax.grad(lambda x: attention(x, x, x, seg, slopes, a.attention)
                              .astype(jnp.float32).sum()))
    rows = [
        ("forward (deterministic)", bench(fwd, params, tkey, steps=a.steps)),
        ("fwd+bwd, no dropout", bench(grad_det, params, tkey, steps=a.steps)),
        ("fwd+bwd, hash dropout", bench(grad_drop, params, tkey, steps=a.steps)),
        ("fwd+bwd, threefry dropout (nn.Dropout)",
         bench(grad_threefry, params, tkey, steps=a.steps)),
        ("fwd+bwd, threefry dropout, rbg keys",
         bench(grad_threefry, params, rkey, steps=a.steps)),
        ("optimizer update only", bench(upd, params, opt_state, params, steps=a.steps)),
        (f"attention {a.attention} fwd x{cfg.num_hidden_layers}",
         cfg.num_hidden_layers * bench(att_f, q, steps=a.steps)),
        (f"attention {a.attention} fwd+bwd x{cfg.num_hidden_layers}",
         cfg.num_hidden_layers * bench(att_fb, q, steps=a.steps)),
        ("full step (the trainer's, hash dropout)", bench(full_step, steps=a.steps)),
    ]
    tokens = a.batch * a.seq
    print(f"\n{a.preset} {a.batch}x{a.seq} on {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}")
    print("| variant | ms | tokens/s |\n| --- | --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {tokens / ms * 1e3:,.0f} |")


if __name__ == "__main__":
    main()
