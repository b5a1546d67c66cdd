"""Select policies: which eligible positions to commit this step.

Each maps `Candidates` (scores, eligibility and the schedule's position) and a key to a bool
commit mask [B, L] inside `eligible_BL`. Every policy except `Reveal` commits at least one
position per step while one is eligible; `Reveal` is MDLM's ancestral step, which may commit
none.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Candidates:
    """What a select policy sees at one step."""

    scores_BL: jax.Array  # float32 [B, L]: higher commits first
    eligible_BL: jax.Array  # bool [B, L]: open positions in the current scope (block)
    step_in_scope_B: jax.Array  # int32 [B]: steps already spent on the current scope
    scope_steps_B: jax.Array  # int32 [B]: steps the schedule gives the scope
    scope_size_B: jax.Array  # int32 [B]: generable positions of the scope, open or not
    reveal_prob_B: jax.Array  # float32 [B]: MDLM's P(an open position is revealed now)

    def rank_BL(self) -> jax.Array:
        """int32 [B, L]: 0 for the best eligible score, then 1, ...; ineligible rank last.

        Ties go to the leftmost position.
        """
        return rank(self.scores_BL, self.eligible_BL)

    def best_BL(self) -> jax.Array:
        """bool [B, L]: the best-scored eligible position of each row (none if none is);
        the same as rank 0 without sorting."""
        scores_BL = jnp.where(self.eligible_BL, self.scores_BL, -jnp.inf)
        best_B = jnp.argmax(scores_BL, axis=-1)
        return self.eligible_BL & (jnp.arange(scores_BL.shape[-1]) == best_B[:, None])

    def num_eligible_B(self) -> jax.Array:
        return jnp.sum(self.eligible_BL, axis=-1, dtype=jnp.int32)


def rank(scores_BL: jax.Array, eligible_BL: jax.Array) -> jax.Array:
    """int32 [B, L]: 0 for the best eligible score, then 1, ...; ineligible rank last;
    ties go to the leftmost position."""
    scores_BL = jnp.where(eligible_BL, scores_BL, -jnp.inf)
    order_BL = jnp.argsort(scores_BL, axis=-1, descending=True, stable=True)
    return jnp.argsort(order_BL, axis=-1).astype(jnp.int32)


def top(c: Candidates, count_B: jax.Array) -> jax.Array:
    """bool [B, L]: the `count_B` best-scored eligible positions of each row."""
    return c.eligible_BL & (c.rank_BL() < count_B[:, None])


@dataclasses.dataclass(frozen=True)
class ScheduledCount:
    """Commits the best-scored positions, as many as the schedule says.

    'linear': ceil(open / steps left), LLaDA's even split (which gives the remainder to the
    first steps). 'cosine': MaskGIT's, leaving floor(N cos(pi/2 * (i+1)/S)) of the scope's N
    positions open after step i of S. The scope's last step commits all that is left.
    """

    schedule: str = "linear"

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"count schedule {self.schedule!r}; allowed: linear, cosine")

    def __call__(self, c: Candidates, key: jax.Array) -> jax.Array:
        del key
        open_B = c.num_eligible_B()
        steps_left_B = jnp.maximum(c.scope_steps_B - c.step_in_scope_B, 1)
        if self.schedule == "linear":
            count_B = -(-open_B // steps_left_B)
        else:
            done_frac_B = jnp.minimum((c.step_in_scope_B + 1) / c.scope_steps_B, 1.0)
            left_B = jnp.floor(c.scope_size_B * jnp.cos(0.5 * math.pi * done_frac_B))
            count_B = open_B - left_B.astype(jnp.int32)
            count_B = jnp.where(steps_left_B == 1, open_B, count_B)
        return top(c, jnp.maximum(count_B, 1))


@dataclasses.dataclass(frozen=True)
class FixedCount:
    """Commits the `count` best-scored positions every step."""

    count: int = 1

    def __call__(self, c: Candidates, key: jax.Array) -> jax.Array:
        del key
        if self.count == 1:
            return c.best_BL()
        return top(c, jnp.full(c.scope_size_B.shape, self.count, jnp.int32))


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Commits every position scoring above `threshold`, and the best one (Fast-dLLM)."""

    threshold: float = 0.9

    def __call__(self, c: Candidates, key: jax.Array) -> jax.Array:
        del key
        return (c.eligible_BL & (c.scores_BL > self.threshold)) | c.best_BL()


@dataclasses.dataclass(frozen=True)
class Factor:
    """Fast-dLLM's factor rule: the n best, for the largest n whose n-th best confidence c_n
    has (n + 1) (1 - c_n) < factor, and at least one."""

    factor: float = 1.0

    def __call__(self, c: Candidates, key: jax.Array) -> jax.Array:
        del key
        rank_BL = c.rank_BL()
        n_BL = (rank_BL + 1).astype(jnp.float32)
        passes_BL = c.eligible_BL & ((n_BL + 1.0) * (1.0 - c.scores_BL) < self.factor)
        # Count the leading run of passing ranks: a rank counts if every better one passes.
        passes_by_rank_BL = jnp.zeros_like(passes_BL).at[
            jnp.arange(passes_BL.shape[0])[:, None], rank_BL].set(passes_BL)
        count_B = jnp.sum(jnp.cumprod(passes_by_rank_BL, axis=-1), axis=-1, dtype=jnp.int32)
        return top(c, jnp.maximum(count_B, 1))


@dataclasses.dataclass(frozen=True)
class Reveal:
    """MDLM's ancestral step: each open position is revealed with `reveal_prob_B`."""

    def __call__(self, c: Candidates, key: jax.Array) -> jax.Array:
        u_BL = jax.random.uniform(key, c.eligible_BL.shape, jnp.float32)
        return c.eligible_BL & (u_BL < c.reveal_prob_B[:, None])
