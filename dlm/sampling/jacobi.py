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

Jacobi Forcing's decoder (Hu et al., 2025) adds two things, both here. *Blocks in flight*:
`blocks` windows of `window` guesses are refined together (one window of blocks x window
positions per call; the reference's activation ratio, which starts a later block only once
the first has mostly converged, is not reproduced: every block is refined from the start).
*Rejection recycling*: the predicted windows of earlier calls, which the acceptance cut
short, are kept in a pool of `pool` n-grams; each call also verifies, in the same batched
call, every pooled n-gram that holds the last committed token, continued from there (the
current guesses fill what it lacks), and each row keeps the candidate with the longest
accepted run. Any accepted run is greedy's, so recycling only changes the number of calls,
never the output; each call then runs 1 + `pool` windows.
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
    pool_BPK: jax.Array  # int32 [B, P, k]: earlier calls' predicted windows (-1: empty)
    newest: jax.Array  # int32 []: the pool slot written last


@dataclasses.dataclass(frozen=True)
class Jacobi:
    """A Jacobi step rule: `window` x `blocks` (k) positions predicted per call, greedy.

    Attributes:
      window: the guesses of one block (k = 1 is `ar` greedy, one call a token).
      transforms: logits transforms before the argmax (EOS suppression).
      blocks: blocks of `window` guesses refined together (Jacobi Forcing's multi-block).
      pool: earlier predicted windows kept for rejection recycling (0: none); each call
        verifies 1 + pool candidate windows in one batched call.
    """

    window: int = 8
    transforms: tuple = ()
    blocks: int = 1
    pool: int = 0

    network_kind: ClassVar[str] = "causal"
    uses_prefix: ClassVar[bool] = True

    def __post_init__(self):
        for name, least in (("window", 1), ("blocks", 1), ("pool", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name}={value!r} must be an int >= {least}")

    @property
    def size(self) -> int:
        """k: the positions predicted per call."""
        return self.window * self.blocks

    def max_steps(self, length: int, prefix_len: int) -> int:
        return length - max(prefix_len, 1)  # at least one token per call

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        batch, length = state.tokens_BL.shape
        kv = network.init_cache_fn(batch, length + self.size)  # room for a window past L
        if prefix_len > 1:
            _, kv = network.decode_fn(params, state.tokens_BL[:, :prefix_len - 1], kv)
            state = state.called(prefix_len - 1)
        guesses_BK = jnp.full((batch, self.size), network.vocab.mask_id, jnp.int32)
        pool_BPK = jnp.full((batch, self.pool, self.size), -1, jnp.int32)
        return state.replace(cache=JacobiCarry(kv=kv, guesses_BK=guesses_BK, pool_BPK=pool_BPK,
                                               newest=jnp.full((), -1, jnp.int32)))

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        del key
        k = self.size
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
        last_B = state.tokens_BL[:, fed_at]
        guesses_CBK = jnp.concatenate(
            [carry.guesses_BK[None], self._recycled(carry, last_B)], axis=0)
        guesses_CBK = jnp.where(known_BK, known_tokens_BK, guesses_CBK)
        fed_CBK = jnp.concatenate(
            [jnp.broadcast_to(last_B[None, :, None], (len(guesses_CBK), batch, 1)),
             guesses_CBK[..., :-1]], axis=-1)
        # Every candidate (the plain window first) against the one cache, in one call.
        logits_CBKV, kv_C = jax.vmap(lambda fed_BK: network.decode_fn(
            params, fed_BK, carry.kv))(fed_CBK)
        log_probs_CBKV = transforms.log_probs(logits_CBKV, self.transforms, network.vocab)
        predicted_CBK = jnp.argmax(log_probs_CBKV, axis=-1).astype(jnp.int32)
        predicted_CBK = jnp.where(known_BK, known_tokens_BK, predicted_CBK)

        # Prediction j is greedy's while guesses 1..j-1 equalled predictions 1..j-1.
        matched_CBK = guesses_CBK[..., :-1] == predicted_CBK[..., :-1]
        accepted_CB = 1 + jnp.sum(jnp.cumprod(matched_CBK, axis=-1), axis=-1)
        best_B = jnp.argmax(accepted_CB, axis=0)  # ties: the plain Jacobi window
        rows_B = jnp.arange(batch)
        predicted_BK = predicted_CBK[best_B, rows_B]
        log_probs_BKV = log_probs_CBKV[best_B, rows_B]
        accepted_B = jnp.minimum(accepted_CB[best_B, rows_B], length - 1 - fed_at)
        accepted = jnp.min(jnp.where(state.done_B, k, accepted_B)).astype(jnp.int32)
        kv = _rows_of(kv_C, best_B, batch)
        confidence_BK = scores.Probability()(log_probs_BKV, predicted_BK, None)

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
        pool_BPK, newest = carry.pool_BPK, carry.newest
        if self.pool:  # the whole predicted window, the run after the accepted one included
            newest = (newest + 1) % self.pool
            pool_BPK = pool_BPK.at[:, newest].set(predicted_BK)
        carry = JacobiCarry(kv=kv.replace(length=carry.kv.length + accepted),
                            guesses_BK=next_BK, pool_BPK=pool_BPK, newest=newest)
        # One call, running every candidate window.
        return state.called(k * len(guesses_CBK)).replace(cache=carry)

    def _recycled(self, carry: JacobiCarry, last_B: jax.Array) -> jax.Array:
        """int32 [P, B, k]: for each pooled window holding the last committed token, the
        guesses that continue it from there (the current guesses where it ends); the current
        guesses for a window without it and for the newest one (whose continuation they
        already are)."""
        if not self.pool:
            return jnp.zeros((0, *carry.guesses_BK.shape), jnp.int32)
        k = self.size
        pool_BPK = carry.pool_BPK
        hit_BPK = pool_BPK == last_B[:, None, None]
        usable_BP = jnp.any(hit_BPK, axis=-1) & (jnp.arange(self.pool) != carry.newest)
        from_BPK = jnp.argmax(hit_BPK, axis=-1)[..., None] + 1 + jnp.arange(k)
        inside_BPK = from_BPK < k
        tail_BPK = jnp.take_along_axis(pool_BPK, jnp.minimum(from_BPK, k - 1), axis=-1)
        current_BPK = jnp.broadcast_to(carry.guesses_BK[:, None], pool_BPK.shape)
        recycled_BPK = jnp.where(inside_BPK & usable_BP[..., None], tail_BPK, current_BPK)
        return jnp.moveaxis(recycled_BPK, 1, 0)


def _rows_of(tree_C, best_B: jax.Array, batch: int):
    """Each row's leaves of candidate best_B[b] from a pytree batched over candidates [C, ...]
    (leaves [C, B, ...] are per row; others are the same for every candidate)."""
    def pick(x):
        if x.ndim >= 2 and x.shape[1] == batch:
            return x[best_B, jnp.arange(batch)]
        return x[0]

    return jax.tree.map(pick, tree_C)
