"""The recipe's optimizer: decoupled AdamW with linear warmup and linear decay (optax)."""

from __future__ import annotations

from typing import Any, Optional

import optax


def warmup_linear_decay(peak_lr: float, total_steps: int, warmup_fraction: float = 0.06,
                        final_lr_fraction: float = 0.02) -> optax.Schedule:
    """Linear warmup over warmup_fraction of the steps, then linear decay to
    final_lr_fraction x peak at total_steps (0.02 for pretraining, 0 for GLUE)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction={warmup_fraction} must be in [0, 1)")
    warmup_steps = int(round(warmup_fraction * total_steps))
    decay = optax.linear_schedule(peak_lr, final_lr_fraction * peak_lr,
                                  max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def decoupled_adamw(schedule: optax.Schedule, peak_lr: float, b1: float = 0.9,
                    b2: float = 0.98, eps: float = 1e-6, weight_decay: float = 1e-5,
                    clip_norm: Optional[float] = None) -> optax.GradientTransformation:
    """AdamW whose decay is p -= weight_decay * (lr_t / peak_lr) * p, as the spec says.

    optax's adamw multiplies its weight_decay by lr_t, so it gets weight_decay / peak_lr.
    Applied to all parameters. Optional global-norm clipping first.
    """
    if peak_lr <= 0:
        raise ValueError(f"peak learning rate {peak_lr} must be positive")
    parts = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                             weight_decay=weight_decay / peak_lr))
    return optax.chain(*parts)


def recipe_optimizer(optimizer: Any, total_steps: int
                     ) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """(schedule, optimizer) of a training config's `optimizer` section over `total_steps`:
    what train.py trains with and the benchmarks time."""
    schedule = warmup_linear_decay(optimizer.lr, total_steps, optimizer.warmup_fraction,
                                   optimizer.final_lr_fraction)
    tx = decoupled_adamw(schedule, optimizer.lr, optimizer.b1, optimizer.b2, optimizer.eps,
                         optimizer.weight_decay, optimizer.clip_norm or None)
    return schedule, tx
