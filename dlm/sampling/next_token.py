"""The autoregressive step rule (`NextToken`): one token per step through a causal
network's KV cache.

Before the loop the first P - 1 prompt tokens are prefilled into the cache (P >= 1: an AR
sample needs at least one token to start from, e.g. BOS). Step i feeds the token at
position P - 1 + i and draws the one at P + i; a position that is already known (infilling
context) keeps its token and is fed as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from dlm.sampling import categorical, scores, transforms
from dlm.sampling.state import SamplerState


@dataclasses.dataclass(frozen=True)
class NextToken:
    """An AR step rule: `transforms` then `proposal` (Categorical or Greedy) at one position."""

    proposal: Any = categorical.Categorical()
    transforms: tuple = ()

    network_kind: ClassVar[str] = "causal"
    uses_prefix: ClassVar[bool] = True

    def max_steps(self, length: int, prefix_len: int) -> int:
        return length - max(prefix_len, 1)

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        batch, length = state.tokens_BL.shape
        cache = network.init_cache_fn(batch, length)
        if prefix_len > 1:
            _, cache = network.decode_fn(params, state.tokens_BL[:, :prefix_len - 1], cache)
            state = state.called(prefix_len - 1)
        return state.replace(cache=cache)

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        batch, length = state.tokens_BL.shape
        position = state.cache.length  # of the token fed now; the drawn one goes after it
        fed_B1 = lax.dynamic_slice(state.tokens_BL, (0, position), (batch, 1))
        logits_B1V, cache = network.decode_fn(params, fed_B1, state.cache)
        log_probs_B1V = transforms.log_probs(logits_B1V, self.transforms, network.vocab)
        drawn_B1 = self.proposal(log_probs_B1V, key)
        confidence_B1 = scores.Probability()(log_probs_B1V, drawn_B1, None)
        at_next_BL = jnp.arange(length) == position + 1
        commit_BL = at_next_BL & state.open_BL(network.vocab.mask_id)
        state = state.committed(commit_BL, jnp.broadcast_to(drawn_B1, (batch, length)),
                                jnp.broadcast_to(confidence_B1, (batch, length)))
        return state.called(1).replace(cache=cache)
