"""Jacobi decoding of a causal LM (`Jacobi`): a window of guesses iterated to greedy's output.

Greedy decoding is the fixed point of y_j = argmax p(. | x_<c, y_1..y_{j-1}) for the next
positions j = 1..k. Each step feeds the last committed token and k - 1 guesses through the
KV cache in one call, so the k predictions are each conditioned on the guesses before them.
The first prediction is conditioned on committed tokens only, so it is greedy's; each next
one is too while every guess before it equalled the prediction made for it. Those n >= 1
predictions are committed (the same tokens greedy decoding makes, in fewer calls when the
guesses were right), the cache keeps the n fed tokens that are now committed, and the
predictions after them become the next guesses (the Jacobi iterate). Rows share the cache's
length, so a batch commits the fewest any running row accepted: every row still gets
exactly its greedy output, which is what the tests check against `ar` greedy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from dlm.sampling import scores, transforms
from dlm.sampling.state import SamplerState


@struct.dataclass
class JacobiCarry:
    kv: Any  # the causal LM's cache: positions 0..length-1 fed
    guesses_BK: jax.Array  # int32 [B, k]: guesses for the k positions after the next fed one


@dataclasses.dataclass(frozen=True)
class Jacobi:
    """A Jacobi step rule: `window` (k) positions predicted per call, greedy.

    Attributes:
      window: k, the predictions per network call (k = 1 is `ar` greedy, one call a token).
      transforms: logits transforms before the argmax (EOS suppression).
    """

    window: int = 8
    transforms: tuple = ()

    network_kind: ClassVar[str] = "causal"
    uses_prefix: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"window={self.window!r} must be a positive int")

    def max_steps(self, length: int, prefix_len: int) -> int:
        return length - max(prefix_len, 1)  # at least one token per call

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        batch, length = state.tokens_BL.shape
        kv = network.init_cache_fn(batch, length + self.window)  # room for a window past L
        if prefix_len > 1:
            _, kv = network.decode_fn(params, state.tokens_BL[:, :prefix_len - 1], kv)
            state = state.called(prefix_len - 1)
        guesses_BK = jnp.full((batch, self.window), network.vocab.mask_id, jnp.int32)
        return state.replace(cache=JacobiCarry(kv=kv, guesses_BK=guesses_BK))

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        del key
        k = self.window
        batch, length = state.tokens_BL.shape
        carry: JacobiCarry = state.cache
        fed_at = carry.kv.length  # the position of the last committed token, fed first
        rows_B1 = jnp.arange(batch)[:, None]

        def at(x_BL, positions_BK, beyond):
            inside_BK = positions_BK < length
            return jnp.where(inside_BK, x_BL[rows_B1, jnp.minimum(positions_BK, length - 1)],
                             beyond)

        # Known positions (infilling context) are fed and predicted as what they hold.
        guess_pos_BK = fed_at + 1 + jnp.arange(k, dtype=jnp.int32)[None]
        known_BK = at(state.known_BL, guess_pos_BK, False)
        known_tokens_BK = at(state.tokens_BL, guess_pos_BK, 0)
        guesses_BK = jnp.where(known_BK, known_tokens_BK, carry.guesses_BK)
        fed_BK = jnp.concatenate([state.tokens_BL[:, fed_at][:, None], guesses_BK[:, :-1]],
                                 axis=1)
        logits_BKV, kv = network.decode_fn(params, fed_BK, carry.kv)
        log_probs_BKV = transforms.log_probs(logits_BKV, self.transforms, network.vocab)
        predicted_BK = jnp.argmax(log_probs_BKV, axis=-1).astype(jnp.int32)
        predicted_BK = jnp.where(known_BK, known_tokens_BK, predicted_BK)
        confidence_BK = scores.Probability()(log_probs_BKV, predicted_BK, None)

        # Prediction j is greedy's while guesses 1..j-1 equalled predictions 1..j-1.
        matched_BK = guesses_BK[:, :-1] == predicted_BK[:, :-1]
        accepted_B = 1 + jnp.sum(jnp.cumprod(matched_BK, axis=-1), axis=-1)
        accepted_B = jnp.minimum(accepted_B, length - 1 - fed_at)
        accepted = jnp.min(jnp.where(state.done_B, k, accepted_B)).astype(jnp.int32)

        # Positions past the end are dropped, never clamped onto the last one.
        commit_BK = (jnp.arange(k)[None] < accepted) & ~known_BK
        commit_BL = jnp.zeros((batch, length), bool).at[rows_B1, guess_pos_BK].set(
            commit_BK, mode="drop")
        tokens_BL = state.tokens_BL.at[rows_B1, guess_pos_BK].set(predicted_BK, mode="drop")
        confidence_BL = jnp.zeros((batch, length), jnp.float32).at[
            rows_B1, guess_pos_BK].set(confidence_BK, mode="drop")
        state = state.committed(commit_BL & state.open_BL(network.vocab.mask_id), tokens_BL,
                                confidence_BL)
        # The next guesses: the predictions after the accepted ones, the last one repeated.
        next_BK = jnp.take(predicted_BK, jnp.minimum(accepted + jnp.arange(k), k - 1), axis=1)
        carry = JacobiCarry(kv=kv.replace(length=carry.kv.length + accepted),
                            guesses_BK=next_BK)
        return state.called(k).replace(cache=carry)
