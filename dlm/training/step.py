"""The train step: gradients written per device (as pmap code is) under `jax.shard_map`.

Each device holds a slice of the global batch and sees the full parameters. Gradients are
summed over the `data` axis and divided by the global number of loss tokens, so the update
equals the one a single device would compute on the whole batch. Randomness is keyed by
step and by example (see `dlm.diffusion.process`), never by device, except dropout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from dlm.parallel import DATA_AXIS, frozen_fns, model_fn
from dlm.training.train_state import TrainState


def _per_device_grads(params, process_state, rng, batch: dict, *, model, process, frozen,
                      grad_accum_steps: int, num_examples: int):
    """Per device: gradients of the global mean loss, summed over the `data` axis.

    Returns (grads, loss, tokens), identical on every device.
    """
    loss_rng, dropout_rng = jax.random.split(rng)
    dropout_rng = jax.random.fold_in(dropout_rng, lax.axis_index(DATA_AXIS))

    def loss_sum(params, micro_batch, micro_index):
        fn = model_fn(model, params, train=True,
                      dropout_rng=jax.random.fold_in(dropout_rng, micro_index))
        _, metrics = process.loss(fn, micro_batch, loss_rng, num_examples=num_examples,
                                  state=process_state,
                                  frozen=frozen_fns(frozen, process_state))
        return metrics["loss_sum"], metrics

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    micro_batches = jax.tree.map(
        lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
        batch)

    def accumulate(carry, inputs):
        grads_sum, loss_total, tokens = carry
        (loss, metrics), grads = grad_fn(params, *inputs)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_total + loss,
                tokens + metrics["token_count"]), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32))
    init = lax.pcast(init, (DATA_AXIS,), to="varying")  # per-device partial sums
    (grads, loss_total, tokens), _ = lax.scan(
        accumulate, init, (micro_batches, jnp.arange(grad_accum_steps)))
    grads, loss_total, tokens = lax.psum((grads, loss_total, tokens), DATA_AXIS)
    return jax.tree.map(lambda g: g / tokens, grads), loss_total / tokens, tokens


def make_train_step(model, process, tx, mesh, *, ema_decay: float, grad_accum_steps: int,
                    global_batch: int, state_sharding=None, frozen=None):
    """Returns `step(state, batch) -> (state, metrics)`, jitted over `mesh`.

    `batch` holds global arrays sharded along `data` on their first axis (tokens,
    loss_mask, example_id). The gradients are computed per device under `shard_map`; the
    optimizer update runs on the state as it is laid out (`state_sharding`: replicated by
    default, or FSDP-sharded, see `dlm.parallel.state_sharding`). `frozen` holds the Flax
    modules of the process's frozen networks (`dlm.parallel.frozen_modules`), bound to the
    params in the process state. The state is donated.
    """
    per_device = functools.partial(
        _per_device_grads, model=model, process=process, frozen=frozen or {},
        grad_accum_steps=grad_accum_steps, num_examples=global_batch)
    grads_fn = jax.shard_map(per_device, mesh=mesh,
                             in_specs=(P(), P(), P(), P(DATA_AXIS)), out_specs=(P(), P(), P()))

    def step(state: TrainState, batch: dict):
        grads, loss, tokens = grads_fn(state.params, state.process_state,
                                       jax.random.fold_in(state.rng, state.step), batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = opt_state.last_finite
        ema_params = state.ema_params
        if ema_params is not None:
            # Warm-up of the decay (as TF's ExponentialMovingAverage with num_updates), so
            # that a short run's EMA is not dominated by the random initialisation.
            step_f = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
            ema_params = jax.tree.map(
                lambda e, p: jnp.where(finite, decay * e + (1.0 - decay) * p, e),
                ema_params, params)
        metrics = {
            "train/loss": loss,
            "train/grad_norm": optax.tree.norm(grads),
            "train/tokens": tokens,
            "train/skipped": (~finite).astype(jnp.int32),
            "train/skipped_in_a_row": opt_state.notfinite_count,
        }
        process_state = process.next_state(state.process_state, params, ema_params,
                                           state.step + 1)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params, process_state=process_state)
        return new_state, metrics

    if state_sharding is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, in_shardings=(state_sharding, None),
                   out_shardings=(state_sharding, None), donate_argnums=0)
