"""Logits transforms: temperature, top-k, top-p (nucleus) and token suppression.

Each maps float32 logits [..., V] to logits of the same shape; removed tokens get -inf. They
run after the mask token is excluded, in the order given (the recipes use: suppression,
temperature, top-k, top-p).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from dlm.sampling.networks import Vocab


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Divides the logits by `temperature` > 0 (temperature 0 is the Greedy proposal)."""

    temperature: float

    def __call__(self, logits: jax.Array, vocab: Vocab) -> jax.Array:
        return logits / self.temperature


@dataclasses.dataclass(frozen=True)
class TopK:
    """Keeps the `k` largest logits of each row (ties with the k-th are kept)."""

    k: int

    def __call__(self, logits: jax.Array, vocab: Vocab) -> jax.Array:
        if self.k >= logits.shape[-1]:
            return logits
        kth = lax.top_k(logits, self.k)[0][..., -1:]
        return jnp.where(logits >= kth, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Keeps the smallest set of most likely tokens whose probability reaches `p` (nucleus).

    That set is every token with probability >= tau, for the largest tau whose tokens still
    reach p. tau is found by bisection rather than by sorting the vocabulary, which is 10-15x
    faster on CPU (and avoids a [B, L, V] sort on accelerators); its precision is
    max_prob * 2**-`iterations`. The most likely token is always kept.
    """

    p: float
    iterations: int = 24

    def __call__(self, logits: jax.Array, vocab: Vocab) -> jax.Array:
        probs = jax.nn.softmax(logits, axis=-1)
        top = jnp.max(probs, axis=-1, keepdims=True)

        def halve(_, bounds):
            low, high = bounds  # tokens >= low reach p; tokens >= high do not
            mid = 0.5 * (low + high)
            reaches = jnp.sum(jnp.where(probs >= mid, probs, 0.0), -1, keepdims=True) >= self.p
            return jnp.where(reaches, mid, low), jnp.where(reaches, high, mid)

        low, _ = lax.fori_loop(0, self.iterations, halve, (jnp.zeros_like(top), top))
        threshold = jnp.where(top >= self.p, top, low)
        return jnp.where(probs >= threshold, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class SuppressEos:
    """Never proposes the end-of-text token (fixed-length generation)."""

    def __call__(self, logits: jax.Array, vocab: Vocab) -> jax.Array:
        if vocab.eos_id is None:
            return logits
        return logits.at[..., vocab.eos_id].set(-jnp.inf)


def standard(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             suppress_eos: bool = False) -> tuple:
    """The transforms a recipe's common options ask for, in the standard order.

    Temperature 0 adds nothing: the recipe then uses the Greedy proposal.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0: off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must lie in (0, 1] (1: off)")
    chain = []
    if suppress_eos:
        chain.append(SuppressEos())
    if temperature not in (0, 1):
        chain.append(Temperature(float(temperature)))
    if top_k:
        chain.append(TopK(top_k))
    if top_p < 1.0:
        chain.append(TopP(float(top_p)))
    return tuple(chain)


def log_probs(logits_BLV: jax.Array, transforms: tuple, vocab: Vocab) -> jax.Array:
    """float32 [B, L, V] log-probabilities: mask id excluded, then `transforms` applied."""
    logits_BLV = logits_BLV.astype(jnp.float32).at[..., vocab.mask_id].set(-jnp.inf)
    for transform in transforms:
        logits_BLV = transform(logits_BLV, vocab)
    return jax.nn.log_softmax(logits_BLV, axis=-1)
