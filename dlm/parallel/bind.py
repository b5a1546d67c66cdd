"""Binding Flax networks to parameters: the `ModelFn`s a process calls.

A process never sees parameters (see `dlm.diffusion.process`): the train step, the evaluator
and the process-state search bind the trained network with `model_fn`, and the frozen
networks a process declares (`Process.frozen_networks`) with `frozen_fns`, from the params
held in the process state.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax

from dlm.models import registry as model_registry


def model_fn(model, params, *, train: bool, dropout_rng: jax.Array | None = None):
    """Binds a Flax network to `params`: returns `fn(tokens_BL, t_B, **options) -> logits_BLV`
    (options: the Backbone's positions_BL, mask, output_len)."""
    rngs = {"dropout": dropout_rng} if train else None

    def fn(tokens_BL, t_B=None, **options):
        return model.apply({"params": params}, tokens_BL, t_B, train=train, rngs=rngs, **options)

    return fn


def frozen_modules(process, model, model_config, vocab_size: int) -> dict[str, Any]:
    """{key: Flax module} of the process's frozen networks: the run's own `model` (for None)
    or the registered model of that name at the run's size (`model_config`)."""
    modules = {}
    for key, name in process.frozen_networks().items():
        if name is None:
            modules[key] = model
        else:
            config = model_config.copy_and_resolve_references()
            config.name = name
            modules[key] = model_registry.build_model(config, vocab_size)
    return modules


def frozen_fns(modules: Mapping[str, Any], process_state) -> dict[str, Any]:
    """{key: ModelFn} of the frozen networks, bound (train=False, gradient stopped) to the
    params the process state holds under each key."""
    return {key: model_fn(module, jax.lax.stop_gradient(process_state[key]), train=False)
            for key, module in modules.items()}


def frozen_params(process, modules: Mapping[str, Any], seq_len: int, source=None
                  ) -> dict[str, Any]:
    """{key: params} for `process.init_state`: `source` (the init_from run's weights, in its
    own structure) for every frozen network, or fresh placeholders of their structure when
    `source` is None. Raises ValueError when `source` does not fit a frozen network."""
    params = {}
    for key, module in modules.items():
        fresh = functools.partial(model_registry.init_params, module, seq_len)
        if source is None:
            params[key] = fresh(jax.random.PRNGKey(0))
            continue
        placeholder = jax.eval_shape(fresh, jax.random.PRNGKey(0))
        _check_fits(placeholder, source, f"the frozen network {key!r} ({type(module).__name__})")
        params[key] = jax.tree.map(lambda x, p: jax.numpy.asarray(x, p.dtype), source,
                                   placeholder)
    return params


def _check_fits(placeholder, source, what: str) -> None:
    """ValueError unless `source` has the placeholder's parameter paths and shapes."""
    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(placeholder), sep="/")
    try:
        have = flax.traverse_util.flatten_dict(flax.core.unfreeze(source), sep="/")
    except (TypeError, ValueError, AttributeError):
        have = {}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    shapes = sorted(p for p in want.keys() & have.keys()
                    if tuple(want[p].shape) != tuple(have[p].shape))
    if missing or extra or shapes:
        raise ValueError(
            f"the init_from run's network does not fit {what} (config.model must match the "
            f"init_from run's model size): missing {missing[:3]}, unexpected {extra[:3]}, "
            f"other shapes {shapes[:3]}")
