"""Score policies: how confident the model is at each position (higher commits first).

Each maps (log_probs_BLV of the transformed distribution, proposed tokens_BL, key) to
float32 scores [B, L].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Probability:
    """The probability of the proposed token (LLaDA's and Fast-dLLM's confidence)."""

    def __call__(self, log_probs_BLV, tokens_BL, key):
        del key
        return jnp.exp(jnp.take_along_axis(log_probs_BLV, tokens_BL[..., None], -1)[..., 0])


@dataclasses.dataclass(frozen=True)
class Margin:
    """Top-1 minus top-2 probability (Dream's 'topk_margin')."""

    def __call__(self, log_probs_BLV, tokens_BL, key):
        del tokens_BL, key
        top2 = jnp.exp(lax.top_k(log_probs_BLV, 2)[0])
        return top2[..., 0] - top2[..., 1]


@dataclasses.dataclass(frozen=True)
class NegEntropy:
    """Minus the entropy of the distribution (Dream's 'entropy')."""

    def __call__(self, log_probs_BLV, tokens_BL, key):
        del tokens_BL, key
        probs = jnp.exp(log_probs_BLV)
        return jnp.sum(jnp.where(probs > 0, probs * log_probs_BLV, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class Random:
    """Uniform noise: a uniformly random order (LLaDA's 'random' remasking)."""

    def __call__(self, log_probs_BLV, tokens_BL, key):
        del log_probs_BLV
        return jax.random.uniform(key, tokens_BL.shape, jnp.float32)


SCORES = {"confidence": Probability, "margin": Margin, "entropy": NegEntropy,
          "random": Random}
# Other names the papers use for them: LLaDA's remasking 'low_confidence' remasks the least
# confident positions, i.e. commits the most confident ones first.
ALIASES = {"low_confidence": "confidence"}


def by_name(name: str, allowed: tuple[str, ...] | None = None, option: str | None = None):
    """The score policy called `name`, a key of SCORES or ALIASES.

    `allowed` (default: SCORES) restricts the names a caller takes; `option` is the option
    the name came from, for the error message. Raises ValueError for another name.
    """
    allowed = tuple(SCORES) if allowed is None else allowed
    if name not in allowed:
        what = f"{option}={name!r}" if option else f"unknown score {name!r}"
        raise ValueError(f"{what}; allowed: {', '.join(allowed)}")
    return SCORES[ALIASES.get(name, name)]()
