"""The train state: everything a resumed run needs, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Params, optimizer state, EMA params, step, the run's base RNG key and the process
    state (e.g. BD3-LM's clip interval; None for processes without one).

    `rng` never changes: the key of step s is `fold_in(rng, s)`, so a resumed run draws
    exactly the numbers the uninterrupted one would have.
    """

    step: jax.Array  # int32 []
    params: Any
    opt_state: optax.OptState
    ema_params: Any  # None when the EMA is disabled
    rng: jax.Array  # uint32 [2]
    process_state: Any = None

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array,
               use_ema: bool, process_state: Any = None) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
            rng=rng,
            process_state=process_state,
        )

    def eval_params(self, use_ema: bool):
        """The weights to evaluate or sample with: the EMA when there is one and asked."""
        return self.ema_params if use_ema and self.ema_params is not None else self.params
