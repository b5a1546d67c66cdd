"""The sampler loop's state and its result."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplerState:
    """Everything the sampler loop carries from one step to the next.

    A position is *open* while it holds the mask id and is not known; known positions
    (prompt, infilling context) never change.
    """

    tokens_BL: jax.Array  # int32 [B, L]
    known_BL: jax.Array  # bool [B, L]: conditioning positions
    t_B: jax.Array  # float32 [B]: current diffusion time (1: all open, 0: done)
    step: jax.Array  # int32 []: steps taken
    nfe: jax.Array  # int32 []: network calls made for the batch
    nfe_B: jax.Array  # int32 [B]: network calls made while each sample was running
    done_B: jax.Array  # bool [B]
    rng: jax.Array  # key; step k draws from fold_in(rng, k)
    confidence_BL: jax.Array  # float32 [B, L]: the score a token was committed with (NaN: none)
    commit_step_BL: jax.Array  # int32 [B, L]: the step a token was committed at (-1: not)
    # int32 [B]: query positions the network processed for each sample while it ran (L per
    # plain forward; fewer with a KV cache): the cost beyond NFE of `called`.
    token_forwards_B: jax.Array
    remasked_B: jax.Array  # int32 [B]: committed tokens taken back (re-masked) so far
    cache: Any = None  # the step rule's own carry: cached logits, a KV cache, ...

    @classmethod
    def start(cls, tokens_BL: jax.Array, known_BL: jax.Array, rng: jax.Array,
              mask_id: int) -> SamplerState:
        """The state before a rule's `init`: open positions (not `known_BL` [B, L]) hold the
        mask id, t is 1 and nothing is committed yet."""
        batch, length = tokens_BL.shape
        known_BL = known_BL.astype(bool)
        return cls(
            tokens_BL=jnp.where(known_BL, tokens_BL, mask_id).astype(jnp.int32),
            known_BL=known_BL,
            t_B=jnp.ones((batch,), jnp.float32),
            step=jnp.zeros((), jnp.int32),
            nfe=jnp.zeros((), jnp.int32),
            nfe_B=jnp.zeros((batch,), jnp.int32),
            done_B=jnp.zeros((batch,), bool),
            rng=rng,
            confidence_BL=jnp.full((batch, length), jnp.nan, jnp.float32),
            commit_step_BL=jnp.full((batch, length), -1, jnp.int32),
            token_forwards_B=jnp.zeros((batch,), jnp.int32),
            remasked_B=jnp.zeros((batch,), jnp.int32),
        )

    def called(self, positions, calls=1) -> SamplerState:
        """The state after `calls` (int or int32 []) network calls each processing
        `positions` query positions per sample (int or int32 [B])."""
        calls = jnp.asarray(calls, jnp.int32)
        return self.replace(nfe=self.nfe + calls,
                            token_forwards_B=self.token_forwards_B + calls * positions)

    def open_BL(self, mask_id: int) -> jax.Array:
        """bool [B, L]: positions still to generate."""
        return (self.tokens_BL == mask_id) & ~self.known_BL

    def committed(self, commit_BL: jax.Array, new_tokens_BL: jax.Array,
                  confidence_BL: jax.Array) -> SamplerState:
        """The state with `new_tokens_BL` written where `commit_BL`, and the statistics."""
        return self.replace(
            tokens_BL=jnp.where(commit_BL, new_tokens_BL, self.tokens_BL),
            confidence_BL=jnp.where(commit_BL, confidence_BL, self.confidence_BL),
            commit_step_BL=jnp.where(commit_BL, self.step, self.commit_step_BL),
        )

    def reopened(self, remask_BL: jax.Array, mask_id: int) -> SamplerState:
        """The state with the committed tokens at `remask_BL` [B, L] taken back: mask id,
        no confidence, no commit step, counted in `remasked_B`. Known positions never
        re-open (they are left out of `remask_BL` here)."""
        remask_BL = remask_BL & ~self.known_BL & (self.tokens_BL != mask_id)
        return self.replace(
            tokens_BL=jnp.where(remask_BL, mask_id, self.tokens_BL),
            confidence_BL=jnp.where(remask_BL, jnp.nan, self.confidence_BL),
            commit_step_BL=jnp.where(remask_BL, -1, self.commit_step_BL),
            remasked_B=self.remasked_B + jnp.sum(remask_BL, axis=-1, dtype=jnp.int32),
        )


@struct.dataclass
class SampleOutput:
    """What a sampler returns (the final state without its carry)."""

    tokens_BL: jax.Array  # int32 [B, L]: the whole sequences, conditioning included
    known_BL: jax.Array  # bool [B, L]
    nfe: jax.Array  # int32 []: network calls for the batch
    nfe_B: jax.Array  # int32 [B]: network calls while each sample was running
    steps: jax.Array  # int32 []: loop iterations
    done_B: jax.Array  # bool [B]: finished (no open position left)
    confidence_BL: jax.Array  # float32 [B, L]
    commit_step_BL: jax.Array  # int32 [B, L]
    token_forwards_B: jax.Array  # int32 [B]: query positions processed for each sample
    remasked_B: jax.Array  # int32 [B]: committed tokens re-masked (remasking policies)

    @classmethod
    def from_state(cls, state: SamplerState) -> SampleOutput:
        return cls(tokens_BL=state.tokens_BL, known_BL=state.known_BL, nfe=state.nfe,
                   nfe_B=state.nfe_B, steps=state.step, done_B=state.done_B,
                   confidence_BL=state.confidence_BL, commit_step_BL=state.commit_step_BL,
                   token_forwards_B=state.token_forwards_B, remasked_B=state.remasked_B)
