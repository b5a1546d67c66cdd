"""FreeDave (Wu & Zhang, 2025): lossless parallel decoding by drafting and verifying the
static decode's own future states.

The *static* decode is a masked-diffusion rule run one step per network call: s_{i+1} =
U(s_i, f(s_i), key_i), with f the network's forward and U the rule's update (propose,
score, commit; `Unmask.advance`, `BlockUnmask.advance`). Given f(s) for the current state,
FreeDave drafts D_1 = U(s, f(s)), D_j = U(D_{j-1}, f(s)) (the next j steps as if the logits
did not change: for one token per step, the j most confident positions), runs the network
on all K drafts in one batched call, and forms the targets T_j = U(D_j, f(D_j)). D_1 is
s_{i+1} exactly, and if D_j = s_{i+j} then T_j = s_{i+j+1}, so every draft in the leading
run with D_{j+1} = T_j is a state of the static decode: the longest such run (m drafts) is
accepted, and f(D_m) from the same call drafts the next step. Each call advances m >= 1
static steps, and the output is the static decode's token for token under the same key:
draft j uses the key the static decode uses at its step i + j - 1, so the rule may draw
(temperature > 0, random remasking) and stay lossless. `drafts` (K) is the compute budget
the paper trades for calls: each call runs K sequences (K times the token forwards).

Rows share the static step (the key and the schedule's position), so a batch accepts the
fewest drafts any running row verified, as Jacobi decoding does. A call whose first draft
already completes the scope (the sequence; bd3lm: the block) is skipped, so the calls
never exceed the static decode's. With semi-autoregressive blocks the drafts run on into
the next block (the reference's eager mode); bd3lm's drafts stay in the current block,
whose cache of committed blocks they share.

Departures from the reference (cychomatica/FreeDave): drafts are whole sequences verified
as a batch (its 'batch_expanding' mode) rather than branches of a tree-attention mask;
verification is exact token equality of whole states; and lossless holds for any
deterministic-given-key base rule, not only greedy one-token-per-step decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from dlm.sampling.engine import keep_done
from dlm.sampling.state import SamplerState
from dlm.sampling.stop import Stop


@struct.dataclass
class FreeDaveCarry:
    base: Any  # the base rule's carry
    logits: jax.Array  # float32 [B, T, V]: the base's scope logits of the current state
    fresh: jax.Array  # bool []: `logits` belong to the current state
    static_step: jax.Array  # int32 []: steps of the static decode taken


@dataclasses.dataclass(frozen=True)
class FreeDave:
    """Draft-and-verify around a static rule (`Unmask` without caches, `BlockUnmask`
    without the sub-block cache): the static rule's output in fewer network calls.

    Attributes:
      base: the static decode's rule; it provides `enter`, `scope_logits`,
        `call_positions`, `scope_done` and `advance`.
      drafts: K, the drafts verified per call (1: the static decode itself).
      stop: the sampler's stop policy, applied after every drafted step as the loop applies
        it after every static step.
    """

    base: Any
    drafts: int = 4
    stop: Stop = Stop()

    uses_prefix = False

    def __post_init__(self):
        if not isinstance(self.drafts, int) or isinstance(self.drafts, bool) or self.drafts < 1:
            raise ValueError(f"drafts={self.drafts!r} must be a positive int")
        if getattr(self.base, "kv", None) is not None or getattr(self.base, "cache_logits",
                                                                 False):
            raise ValueError("FreeDave verifies a static decode: its base takes no "
                             "approximate KV cache and no cache_logits")
        inner = getattr(self.base, "inner", self.base)
        if getattr(inner, "history", None) is not None:
            raise ValueError("FreeDave drafts K steps from one forward, which would feed a "
                             "step-history policy (credit) stale logits: its base takes none")
        if getattr(self.base, "sub_cache", False):
            raise ValueError("FreeDave verifies a static decode: its base takes no sub-block "
                             "cache")

    @property
    def network_kind(self) -> str:
        return self.base.network_kind

    def for_network(self, network) -> FreeDave:
        if hasattr(self.base, "for_network"):
            return dataclasses.replace(self, base=self.base.for_network(network))
        return self

    def max_steps(self, length: int, prefix_len: int = 0) -> int:
        return self.base.max_steps(length, prefix_len)

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        state = self.base.init(network, params, state, prefix_len)
        entered, _ = self.base.enter(network, params, state)
        logits = jax.eval_shape(lambda s: self.base.scope_logits(network, params, s), entered)
        zero = jnp.zeros((), jnp.int32)
        return state.replace(cache=FreeDaveCarry(
            base=state.cache, logits=jnp.zeros(logits.shape, logits.dtype),
            fresh=jnp.zeros((), bool), static_step=zero))

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        del key  # each drafted step takes the key of its static step
        length = state.tokens_BL.shape[1]
        max_steps = self.max_steps(length)
        carry: FreeDaveCarry = state.cache
        return lax.cond(carry.static_step < max_steps,
                        lambda s: self._verified_step(network, params, s, max_steps),
                        lambda s: s, state)

    def _verified_step(self, network, params, state: SamplerState,
                       max_steps: int) -> SamplerState:
        base, k = self.base, self.drafts
        vocab = network.vocab
        length = state.tokens_BL.shape[1]
        carry: FreeDaveCarry = state.cache
        iteration = state.step
        s = carry.static_step
        state = state.replace(cache=carry.base, step=s)
        state, moved = base.enter(network, params, state)
        fresh = carry.fresh & ~moved

        def forward():
            return base.scope_logits(network, params, state)

        logits = lax.cond(fresh, lambda: carry.logits, forward)
        state = state.called(base.call_positions(length), ~fresh)

        def advance(before: SamplerState, logits, i) -> SamplerState:
            key = jax.random.fold_in(state.rng, s + i)
            after = self.stop.update(base.advance(network, before.replace(step=s + i),
                                                  logits, key), vocab)
            return keep_done(before, after)

        drafts = [advance(state, logits, 0)]
        for i in range(1, k):
            drafts.append(advance(drafts[-1], logits, i))

        def verify():
            tokens_KBL = jnp.stack([d.tokens_BL for d in drafts])
            t_KB = jnp.stack([d.t_B for d in drafts])
            return jax.vmap(lambda tokens_BL, t_B: base.scope_logits(
                network, params, state.replace(tokens_BL=tokens_BL, t_B=t_B)))(tokens_KBL, t_KB)

        call = ~base.scope_done(network, drafts[0]) & (k > 1)
        draft_logits = lax.cond(call, verify, lambda: jnp.zeros((k, *logits.shape),
                                                                 logits.dtype))
        state = state.called(base.call_positions(length) * k, call)
        targets = [advance(drafts[i], draft_logits[i], i + 1) for i in range(k - 1)]

        # Drafts 1..m are the static decode's while each D_{j+1} equals T_j; a draft that
        # completed the scope (bd3lm: the block) ends the run, the next step entering anew.
        batch = state.tokens_BL.shape[0]
        agree_BK = jnp.zeros((batch, 0), bool)
        if k > 1:
            agree_BK = jnp.stack([
                jnp.all(targets[i].tokens_BL == drafts[i + 1].tokens_BL, axis=-1)
                & ~base.scope_done(network, drafts[i]) for i in range(k - 1)], axis=-1)
        accepted_B = 1 + jnp.sum(jnp.cumprod(agree_BK, axis=-1), axis=-1)
        accepted = jnp.min(jnp.where(state.done_B, k, accepted_B))
        accepted = jnp.where(call, accepted, 1)
        accepted = jnp.minimum(accepted, max_steps - s).astype(jnp.int32)

        def pick(xs):
            return jnp.stack(xs)[accepted - 1]

        # The confidence a static step commits with comes from fresh logits: the targets'.
        confidence_BL = drafts[0].confidence_BL
        for i, target in enumerate(targets):
            new_BL = target.commit_step_BL == s + i + 1  # drafts[i] holds steps <= s + i
            confidence_BL = jnp.where(new_BL & (i + 1 < accepted), target.confidence_BL,
                                      confidence_BL)
        chosen = state.replace(
            tokens_BL=pick([d.tokens_BL for d in drafts]), confidence_BL=confidence_BL,
            commit_step_BL=pick([d.commit_step_BL for d in drafts]),
            t_B=pick([d.t_B for d in drafts]))
        next_logits = jnp.where(call, draft_logits[accepted - 1], logits)
        return chosen.replace(step=iteration, cache=FreeDaveCarry(
            base=chosen.cache, logits=next_logits, fresh=call, static_step=s + accepted))
