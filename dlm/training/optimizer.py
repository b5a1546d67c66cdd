"""The optimizer: AdamW with warmup then constant or cosine, clipping, skip of bad steps."""

from __future__ import annotations

import ml_collections
import optax

# apply_if_finite halts nothing by itself; the trainer stops the run after
# `max_consecutive_nonfinite` skipped steps, well before this limit is reached.
_NEVER_FORCE_UPDATE = 2**30
# `optimizer.schedule`: what follows the warmup.
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant or cosine to the floor."""
    warmup = optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1))
    if opt.schedule == "constant":
        after = optax.constant_schedule(opt.learning_rate)
    else:
        decay_steps = max(total_steps - opt.warmup_steps, 1)
        after = optax.cosine_decay_schedule(
            opt.learning_rate, decay_steps, alpha=opt.min_learning_rate / opt.learning_rate)
    return optax.join_schedules([warmup, after], [opt.warmup_steps])


def make_optimizer(opt: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
    """Returns the full update rule; its state reports skipped (non-finite) steps.

    Gradients with a NaN or Inf leave params and moments untouched; see
    `nonfinite_counts` for the counters the trainer watches.
    """
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2,
                             eps=opt.eps, weight_decay=opt.weight_decay))
    return optax.apply_if_finite(optax.chain(*parts), _NEVER_FORCE_UPDATE)


def nonfinite_counts(opt_state) -> tuple:
    """Returns (skipped in a row, skipped in total, last update finite) from the state."""
    return opt_state.notfinite_count, opt_state.total_notfinite, opt_state.last_finite
