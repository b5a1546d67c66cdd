"""Time plans of the time-based masked samplers: MDLM's uniform grid and first hitting times.

A plan gives the next time s_B < t_B of each sample; the sampler reveals each open position
with probability (m(t) - m(s)) / m(t), m(t) = 1 - alpha(t) the mask probability.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlm.diffusion import schedules


@dataclasses.dataclass(frozen=True)
class GridTime:
    """MDLM's grid: step i goes from t_i = 1 - i (1 - eps) / S to t_{i+1}, clipped at 0.

    With S steps the grid ends at eps; a further step (the noise-removal step) goes to 0.
    """

    eps: float = 1e-5

    def next_time(self, t_B, step, num_open_B, schedule, span, key):
        """float32 [B]: t_{step + 1} for a grid of `span` steps."""
        del num_open_B, schedule, key
        s = 1.0 - (step + 1).astype(jnp.float32) * (1.0 - self.eps) / span
        return jnp.full_like(t_B, jnp.maximum(s, 0.0))


@dataclasses.dataclass(frozen=True)
class FirstHitting:
    """The exact time at which the next of the n open positions is revealed.

    Each open position at time t is revealed at an independent time tau with
    P(tau < s) = m(s) / m(t); the first of n is at m(s) = m(t) u^(1/n), u ~ U(0, 1)
    (Zheng et al., 2024). One position is then revealed per network call.
    """

    def next_time(self, t_B, step, num_open_B, schedule, span, key):
        """float32 [B]: the time of the next reveal."""
        del step, span
        u_B = jax.random.uniform(key, t_B.shape, jnp.float32, minval=1e-12, maxval=1.0)
        exponent_B = 1.0 / jnp.maximum(num_open_B, 1).astype(jnp.float32)
        return time_at_mask_prob(schedule, schedule.mask_prob(t_B) * u_B**exponent_B)


def time_at_mask_prob(schedule: schedules.Schedule, mask_prob_B: jax.Array,
                      iterations: int = 40) -> jax.Array:
    """float32 [B]: the time t in [0, 1] with schedule.mask_prob(t) = mask_prob_B.

    Closed form for the log-linear schedule, bisection (mask_prob increases) otherwise.
    """
    if isinstance(schedule, schedules.LogLinearSchedule):
        return jnp.clip(mask_prob_B / (1.0 - schedule.eps), 0.0, 1.0)
    low_B = jnp.zeros_like(mask_prob_B)
    high_B = jnp.ones_like(mask_prob_B)
    for _ in range(iterations):
        mid_B = 0.5 * (low_B + high_B)
        below_B = schedule.mask_prob(mid_B) < mask_prob_B
        low_B = jnp.where(below_B, mid_B, low_B)
        high_B = jnp.where(below_B, high_B, mid_B)
    return 0.5 * (low_B + high_B)
