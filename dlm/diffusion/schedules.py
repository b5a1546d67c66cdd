"""Noise schedules for masked diffusion, and low-discrepancy time sampling.

A schedule gives alpha(t), the probability that a token is still clean at time t in [0, 1].
Every schedule here has alpha(0) = 1 exactly and alpha(1) = eps (eps = 0 reaches the
all-masked prior exactly; MDLM uses eps = 1e-3 for numerical safety).
"""

import abc
import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dlm.registry import Registry


class Schedule(abc.ABC):
    """alpha(t) and the quantities the losses need; all map float arrays elementwise."""

    @abc.abstractmethod
    def alpha(self, t: jax.Array) -> jax.Array:
        """Probability a token is clean at time t; same shape as t."""

    @abc.abstractmethod
    def alpha_prime(self, t: jax.Array) -> jax.Array:
        """d alpha / dt (<= 0); same shape as t."""

    def mask_prob(self, t: jax.Array) -> jax.Array:
        """1 - alpha(t), the probability a token is masked at time t; same shape as t.

        Subclasses override it with a form that keeps precision for small t.
        """
        return 1.0 - self.alpha(t)

    def loss_weight(self, t: jax.Array) -> jax.Array:
        """-alpha'(t) / (1 - alpha(t)) > 0, the continuous-time NELBO weight; same shape as t."""
        return -self.alpha_prime(t) / self.mask_prob(t)


@dataclasses.dataclass(frozen=True)
class LogLinearSchedule(Schedule):
    """MDLM's log-linear schedule: sigma(t) = -log(1 - (1 - eps) t), alpha(t) = 1 - (1 - eps) t."""

    eps: float = 1e-3

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t):
        return jnp.full_like(t, -(1.0 - self.eps))

    def mask_prob(self, t):
        return (1.0 - self.eps) * t

    def loss_weight(self, t):
        return 1.0 / t


@dataclasses.dataclass(frozen=True)
class LinearSchedule(Schedule):
    """Total noise sigma(t) = -log alpha(t) linear in t: alpha(t) = eps ** t (needs eps > 0).

    This is MDLM's `LinearNoise` (sigma_max = -log eps). alpha linear in t is the log-linear
    schedule (or polynomial with power 1).
    """

    eps: float = 1e-3

    @property
    def sigma_max(self) -> float:
        return -math.log(self.eps)

    def alpha(self, t):
        return jnp.exp(-self.sigma_max * t)

    def alpha_prime(self, t):
        return -self.sigma_max * jnp.exp(-self.sigma_max * t)

    def mask_prob(self, t):
        return -jnp.expm1(-self.sigma_max * t)

    def loss_weight(self, t):
        return self.sigma_max / jnp.expm1(self.sigma_max * t)


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
    """alpha(t) = eps + (1 - eps) cos(pi t / 2)."""

    eps: float = 1e-3

    def alpha(self, t):
        return self.eps + (1.0 - self.eps) * jnp.cos(0.5 * jnp.pi * t)

    def alpha_prime(self, t):
        return -(1.0 - self.eps) * 0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t)

    def mask_prob(self, t):
        # 1 - cos(x) = 2 sin^2(x / 2), exact for small t.
        return (1.0 - self.eps) * 2.0 * jnp.sin(0.25 * jnp.pi * t) ** 2

    def loss_weight(self, t):
        # sin(x) / (1 - cos(x)) = cot(x / 2).
        return 0.5 * jnp.pi / jnp.tan(0.25 * jnp.pi * t)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule(Schedule):
    """alpha(t) = 1 - (1 - eps) t ** power."""

    power: float = 1.0
    eps: float = 1e-3

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t**self.power

    def alpha_prime(self, t):
        return -(1.0 - self.eps) * self.power * t ** (self.power - 1.0)

    def mask_prob(self, t):
        return (1.0 - self.eps) * t**self.power

    def loss_weight(self, t):
        return self.power / t


def _linear(eps: float, config) -> LinearSchedule:
    del config
    if eps <= 0.0:
        raise ValueError(f"process.schedule_eps={eps} must be > 0 for the 'linear' schedule")
    return LinearSchedule(eps=eps)


def _polynomial(eps: float, config) -> PolynomialSchedule:
    power = float(config.process.get("schedule_power", 1.0))
    if power <= 0.0:
        raise ValueError(f"process.schedule_power={power} must be > 0")
    return PolynomialSchedule(power=power, eps=eps)


# `process.schedule` -> (eps, config) -> Schedule.
SCHEDULES: Registry[Callable[..., Schedule]] = Registry("process.schedule")
SCHEDULES.register("loglinear", lambda eps, config: LogLinearSchedule(eps=eps))
SCHEDULES.register("linear", _linear)
SCHEDULES.register("cosine", lambda eps, config: CosineSchedule(eps=eps))
SCHEDULES.register("polynomial", _polynomial)


def make_schedule(config) -> Schedule:
    """The schedule named by `config.process.schedule` (default 'loglinear', one of
    `SCHEDULES`).

    Reads `process.schedule_eps` (default 1e-3) and, for 'polynomial', `process.schedule_power`
    (default 1.0). Raises ValueError naming the offending key.
    """
    build = SCHEDULES.get(config.process.get("schedule", "loglinear"))
    eps = float(config.process.get("schedule_eps", 1e-3))
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"process.schedule_eps={eps} must lie in [0, 1)")
    return build(eps, config)


def stratified_uniform(rng: jax.Array, example_id_B: jax.Array, num_examples: int) -> jax.Array:
    """Antithetic uniforms u_B in [0, 1): frac(u + example_id / num_examples), one shared u.

    Over a global batch of `num_examples` examples (ids 0..N-1) exactly one value falls in each
    [k/N, (k+1)/N). Each value depends only on (rng, example_id), so a batch split across
    devices gets the same numbers as the whole batch on one device.
    """
    u = jax.random.uniform(rng, (), jnp.float32)
    offset_B = example_id_B.astype(jnp.float32) / num_examples
    return jnp.mod(u + offset_B, 1.0)


def sample_times(
    rng: jax.Array, example_id_B: jax.Array, num_examples: int, t_min: float
) -> jax.Array:
    """Continuous training times t_B in [t_min, 1], stratified as in `stratified_uniform`."""
    u_B = stratified_uniform(rng, example_id_B, num_examples)
    return t_min + (1.0 - t_min) * u_B


def sample_grid_times(
    rng: jax.Array, example_id_B: jax.Array, num_examples: int, num_timesteps: int
) -> jax.Array:
    """Discrete times t_B on the grid {1/T, ..., 1} (T = num_timesteps), stratified.

    Uniform over the grid; when num_examples is a multiple of T every grid point gets
    exactly num_examples / T examples.
    """
    u_B = stratified_uniform(rng, example_id_B, num_examples)
    step_B = jnp.minimum(jnp.floor(u_B * num_timesteps), num_timesteps - 1) + 1.0
    return step_B / num_timesteps
