"""The masked-diffusion step rule: denoise, propose a token everywhere, commit some positions.

One step: call the denoiser on x_t (or reuse its last logits when nothing changed), transform
the logits, propose a token at every position, score the positions, and let the select
policy commit some open positions of the current scope (the whole sequence, or the first
block with open positions in semi-autoregressive decoding). MDLM, first hitting, LLaDA, Dream
and Fast-dLLM are all this rule with different policies (see `recipes`).

In semi-autoregressive decoding only the active block can commit, so the proposals and
scores are computed over each row's *update window* alone: the block's `block_length`
positions (the last `block_length` of the sequence when a short last block would run
past its end). The logits of that window are all a step needs, so with a reuse policy
(`kv`, see `kv_reuse`) they come from a partial call against an approximate KV cache
instead of a full forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from dlm.sampling import adaptive, categorical, kv_reuse, scores, select, transforms
from dlm.sampling.state import SamplerState


@dataclasses.dataclass(frozen=True)
class Unmask:
    """A masked-diffusion step rule.

    Attributes:
      select: which eligible positions to commit (see `select`).
      score: how positions are ranked (see `scores`).
      proposal: Categorical or Greedy (see `categorical`).
      transforms: logits transforms applied before proposing and scoring.
      steps: the schedule's number of steps; None: the sequence length. With blocks they are
        shared evenly between blocks.
      time: a time plan (`times.GridTime`, `times.FirstHitting`) that sets t and the reveal
        probability; None: t is the fraction of generable positions still open.
      block_length: semi-autoregressive blocks (counted from each row's first generable
        position), decoded left to right; None: no blocks.
      final_greedy: one extra last step that commits every open position by argmax (MDLM's
        noise removal).
      cache_logits: reuse the last logits while no token changed (MDLM's ddpm_cache); only
        takes effect for networks that are not time-conditioned.
      kv: an approximate KV cache policy (`kv_reuse`; needs `block_length`): which positions
        the network recomputes at each step, the others' keys/values coming from a cache.
      exit: an early-exit policy (`adaptive.EarlyExit`: Prophet, SchED): once it fires for
        a row, every position still to decode that the step has logits for is committed
        with the step's proposals: the whole sequence after a full forward, the active
        block (the update window) with an approximate KV cache or inside a block sampler.
      remask: a remasking policy (`adaptive.RunningConfidence`, `adaptive.Backtrack`):
        committed positions of the current scope it re-opens after the step's commits,
        within its budget (see `update`); counted in `SamplerState.remasked_B`.
      history: a policy with a step-history carry (`adaptive.Credit`: dInfer's credit
        decoding), kept in the rule's own carry (`UnmaskCarry`) over the update window;
        the step decodes from the logits it fuses.
    """

    select: Any = select.ScheduledCount()
    score: Any = scores.Probability()
    proposal: Any = categorical.Categorical()
    transforms: tuple = ()
    steps: int | None = None
    time: Any = None
    block_length: int | None = None
    final_greedy: bool = False
    cache_logits: bool = False
    kv: Any = None
    exit: Any = None
    remask: Any = None
    history: Any = None

    network_kind: ClassVar[str] = "denoiser"
    uses_prefix: ClassVar[bool] = False

    def __post_init__(self):
        if self.kv is not None and self.block_length is None:
            raise ValueError("an approximate KV cache (the `cache` option) decodes in "
                             "semi-autoregressive blocks: set block_length")
        if self.kv is not None and self.cache_logits:
            raise ValueError("cache_logits and an approximate KV cache exclude each other")
        if self.remask is not None and (self.time is not None or self.cache_logits):
            raise ValueError("remasking takes confidence-ordered commits: not MDLM's ancestral "
                             "reveal (a time plan) nor cache_logits")

    def window_size(self, length: int) -> int | None:
        """The update window of semi-autoregressive decoding (None: the whole sequence)."""
        return None if self.block_length is None else min(self.block_length, length)

    def schedule_steps(self, length: int) -> int:
        return self.steps or length

    def max_steps(self, length: int, prefix_len: int = 0) -> int:
        del prefix_len
        steps = self.schedule_steps(length)
        if self.block_length:
            steps = max(steps, -(-length // self.block_length))  # at least one per block
        if self.remask is not None and not self._scheduled():
            steps += min(self.remask.total, length)  # room to commit re-opened positions
        return steps + int(self.final_greedy)

    def _scheduled(self) -> bool:
        """Whether the select policy's schedule commits all that is open at a scope's last
        step (then re-opening before that step cannot prevent the scope from finishing)."""
        return isinstance(self.select, select.ScheduledCount)

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        if self._caches(network) or self.history is not None:  # they need the logits' shape
            logits = jax.eval_shape(network.apply_fn, params, state.tokens_BL, state.t_B)
        base = None
        if self.kv is not None:
            base = kv_reuse.init(network, *state.tokens_BL.shape)
        elif self._caches(network):
            base = (jnp.zeros(logits.shape, logits.dtype),
                    jnp.full_like(state.tokens_BL, -1))  # no call yet
        if self.history is None:
            return state.replace(cache=base)
        return state.replace(cache=self.own_carry(base, *state.tokens_BL.shape,
                                                  logits.shape[-1]))

    def own_carry(self, base, batch: int, length: int, vocab: int) -> UnmaskCarry:
        """The carry of a rule with a `history` policy: `base` (the KV or logits cache, or
        None) and the history over the update window."""
        width = self.window_size(length) or length
        return UnmaskCarry(base=base, history=self.history.init(batch, width, vocab))

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        own = state.cache if self.history is not None else None
        if own is not None:  # the caches below see their own carry
            state = state.replace(cache=own.base)
        if self.kv is None:
            logits, state = self._logits(network, params, state)
        else:
            mask_id = network.vocab.mask_id
            logits, state = kv_reuse.cached_logits(
                self.kv, network, params, state, self.blocks(state, state.open_BL(mask_id)),
                self.window_size(state.tokens_BL.shape[1]), mask_id)
        if own is not None:
            state = state.replace(cache=own.replace(base=state.cache))
        return self.update(network, state, logits, key)

    def update(self, network, state: SamplerState, logits_BLV: jax.Array,
               key: jax.Array, propose=None) -> SamplerState:
        """Everything in a step after the network call: propose, score, select, commit and
        advance t. `logits_BLV` [B, L, V] are the network's for `state.tokens_BL`, or with
        blocks those of the update window alone [B, block_length, V]; `state.step`
        counts the steps of the sampling being done (a block sampler passes a block's
        sub-state and the step within the block). `propose(log_probs_BLV, key) -> tokens_BL`
        replaces `self.proposal` (EDLM's importance resampling of full candidates); it gets
        the transformed log-probabilities and the key the proposal would have used. Returns
        the state after the commits.
        """
        vocab = network.vocab
        batch, length = state.tokens_BL.shape
        time_key, proposal_key, score_key, select_key = jax.random.split(key, 4)
        open_BL = state.open_BL(vocab.mask_id)
        blocks = self.blocks(state, open_BL)
        window = None if propose is not None else self.window_size(length)
        # A full forward in block decoding: the early exit covers the whole sequence.
        full_BLV = logits_BLV if (self.exit is not None and window is not None
                                  and logits_BLV.shape[1] == length) else None
        if window is not None:  # only the active block can commit: work on it alone
            idx_BW = blocks.window_start_B[:, None] + jnp.arange(window, dtype=jnp.int32)
            if logits_BLV.shape[1] != window:
                logits_BLV = jnp.take_along_axis(logits_BLV, idx_BW[..., None], axis=1)
        # The network's own log-probabilities (before the history's fusion and the logits
        # transforms): what the adaptive policies judge by.
        own_log_probs_BLV = None
        if self.exit is not None or self.remask is not None or self.history is not None:
            own_log_probs_BLV = transforms.log_probs(logits_BLV, (), vocab)
        history = None
        if self.history is not None:  # decode from the fused logits
            view_open_BL = (open_BL if window is None
                            else jnp.take_along_axis(open_BL, idx_BW, axis=1))
            scope_B = (jnp.zeros((batch,), jnp.int32) if window is None
                       else blocks.window_start_B)
            logits_BLV, history = self.history.fuse(state.cache.history, logits_BLV,
                                                    own_log_probs_BLV, view_open_BL, scope_B)
        log_probs_BLV = transforms.log_probs(logits_BLV, self.transforms, vocab)
        proposed_BL = (propose or self.proposal)(log_probs_BLV, proposal_key)
        if self.final_greedy:
            is_last = state.step == self.max_steps(length) - 1
            proposed_BL = jnp.where(is_last, jnp.argmax(log_probs_BLV, -1), proposed_BL)
        scores_BL = self.score(log_probs_BLV, proposed_BL, score_key)
        confidence_BL = scores.Probability()(log_probs_BLV, proposed_BL, None)
        if window is not None:  # back to [B, L]; outside the window nothing can commit
            rows_B1 = jnp.arange(batch)[:, None]
            proposed_BL = state.tokens_BL.at[rows_B1, idx_BW].set(proposed_BL)
            scores_BL = jnp.full((batch, length), -jnp.inf).at[rows_B1, idx_BW].set(scores_BL)
            confidence_BL = jnp.full((batch, length), jnp.nan).at[rows_B1, idx_BW].set(
                confidence_BL)

        candidates = _scope(state, open_BL, scores_BL, blocks, self.schedule_steps(length))
        next_t_B = None
        if self.time is not None:
            num_open_B = jnp.sum(open_BL, axis=-1)
            next_t_B = self.time.next_time(state.t_B, state.step, num_open_B, network.schedule,
                                           self.schedule_steps(length), time_key)
            mask_prob_t_B = network.schedule.mask_prob(state.t_B)
            reveal_prob_B = 1.0 - network.schedule.mask_prob(next_t_B) / mask_prob_t_B
            candidates = candidates.replace(reveal_prob_B=reveal_prob_B)
        commit_BL = self.select(candidates, select_key)
        exit_B = jnp.zeros((batch,), bool)
        if self.exit is not None:
            # Progress: the share of each row's generable positions decoded, counting this
            # step's first commit (step / steps of one token per step over the generation).
            generable_B = jnp.maximum(jnp.sum(~state.known_BL, axis=-1), 1)
            progress = jnp.minimum((generable_B - jnp.sum(open_BL, axis=-1) + 1) / generable_B,
                                   1.0)
            fill_ids = tuple(i for i in (vocab.eos_id, vocab.pad_id) if i is not None)
            # The margins are the network's own (untransformed: top-k / top-p would make
            # them infinite); the fill draws from the transformed distribution.
            if full_BLV is not None:
                full_log_probs_BLV = transforms.log_probs(full_BLV, self.transforms, vocab)
                exit_B = self.exit(transforms.log_probs(full_BLV, (), vocab), open_BL, progress,
                                   fill_ids)
                fill_BL = self.proposal(full_log_probs_BLV, jax.random.fold_in(proposal_key, 1))
                all_in_BL = open_BL & exit_B[:, None]
                proposed_BL = jnp.where(all_in_BL, fill_BL, proposed_BL)
                confidence_BL = jnp.where(all_in_BL, scores.Probability()(
                    full_log_probs_BLV, fill_BL, None), confidence_BL)
            else:
                span_BL = candidates.eligible_BL
                view_span_BL = (span_BL if window is None
                                else jnp.take_along_axis(span_BL, idx_BW, axis=1))
                exit_B = self.exit(own_log_probs_BLV, view_span_BL, progress, fill_ids)
                all_in_BL = span_BL & exit_B[:, None]
            commit_BL = commit_BL | all_in_BL
        remask_B = None
        if self.remask is not None:
            remask_B = jnp.where(exit_B, 0, self._remask_budget(
                state, candidates, commit_BL, length, vocab.mask_id))
            if self.remask.over_commits:
                extra_BL = select.top(candidates.replace(eligible_BL=candidates.eligible_BL
                                                   & ~commit_BL), remask_B)
                commit_BL = commit_BL | extra_BL
                remask_B = jnp.sum(extra_BL, axis=-1, dtype=jnp.int32)
        state = state.committed(commit_BL, proposed_BL, confidence_BL)
        if remask_B is not None:
            state = self._remasked(state, blocks, own_log_probs_BLV,
                                   None if window is None else idx_BW, remask_B, vocab.mask_id)
        if next_t_B is None:
            generable_B = jnp.maximum(jnp.sum(~state.known_BL, axis=-1), 1)
            next_t_B = jnp.sum(state.open_BL(vocab.mask_id), axis=-1) / generable_B
        if history is not None:
            state = state.replace(cache=state.cache.replace(history=history))
        return state.replace(t_B=next_t_B.astype(jnp.float32))

    def _remask_budget(self, state: SamplerState, c: select.Candidates, commit_BL: jax.Array,
                       length: int, mask_id: int) -> jax.Array:
        """int32 [B]: how many positions each row may re-open this step: the policy's
        per-step and remaining total budget, and none where the run could then not end in
        time: at a scope's last scheduled step, or (selects without a schedule, which commit
        at least one position per step) beyond the steps left after the open positions."""
        budget_B = jnp.clip(self.remask.total - state.remasked_B, 0, self.remask.per_step)
        if self._scheduled():
            last_B = c.step_in_scope_B >= c.scope_steps_B - 1
            return jnp.where(last_B, 0, budget_B).astype(jnp.int32)
        steps_left = self.max_steps(length) - int(self.final_greedy) - state.step - 1
        open_after_B = jnp.sum(state.open_BL(mask_id) & ~commit_BL, axis=-1)
        return jnp.clip(steps_left - open_after_B, 0, budget_B).astype(jnp.int32)

    def _remasked(self, state: SamplerState, blocks: Blocks | None, log_probs_BLV: jax.Array,
                  idx_BW: jax.Array | None, count_B: jax.Array, mask_id: int) -> SamplerState:
        """The state with up to `count_B` committed positions of each row's scope re-opened:
        those the policy wants, lowest keep score first."""
        batch, length = state.tokens_BL.shape
        tokens_BL = state.tokens_BL
        view_tokens = tokens_BL if idx_BW is None else jnp.take_along_axis(tokens_BL, idx_BW, 1)
        current = jnp.exp(jnp.take_along_axis(log_probs_BLV, view_tokens[..., None], -1)[..., 0])
        if idx_BW is None:
            current_BL = current
        else:  # outside the view there are no logits: nothing to judge there
            current_BL = jnp.full((batch, length), jnp.inf).at[
                jnp.arange(batch)[:, None], idx_BW].set(current)
        scope_BL = ~state.known_BL & (tokens_BL != mask_id)
        if blocks is not None:
            scope_BL &= blocks.block_BL == blocks.active_B[:, None]
        if not self.remask.takes_new:
            scope_BL &= state.commit_step_BL < state.step
        scope_BL &= jnp.isfinite(current_BL) & self.remask.wants(state, current_BL)
        chosen_BL = adaptive.lowest(self.remask.keep_scores(state, current_BL), scope_BL,
                                    count_B)
        return state.reopened(chosen_BL, mask_id)

    def _caches(self, network) -> bool:
        return self.cache_logits and not network.time_conditioned

    # The parts of a step that `freedave.FreeDave` verifies drafts with (as BlockUnmask's).
    def enter(self, network, params, state: SamplerState) -> tuple[SamplerState, jax.Array]:
        """Nothing to set up before a step; (state, False)."""
        del network, params
        return state, jnp.zeros((), bool)

    def call_positions(self, length: int) -> int:
        return length

    def scope_done(self, network, state: SamplerState) -> jax.Array:
        """bool []: no row has an open position left."""
        return ~jnp.any(state.open_BL(network.vocab.mask_id))

    def scope_logits(self, network, params, state: SamplerState) -> jax.Array:
        """float32 [B, L, V]: the full forward of `state`, uncounted."""
        return network.apply_fn(params, state.tokens_BL, state.t_B).astype(jnp.float32)

    def advance(self, network, state: SamplerState, logits_BLV: jax.Array,
                key: jax.Array) -> SamplerState:
        return self.update(network, state, logits_BLV, key)

    def _logits(self, network, params, state: SamplerState):
        """(logits_BLV, state with nfe and cache updated)."""
        def call():
            return self.scope_logits(network, params, state)

        length = state.tokens_BL.shape[1]
        if not self._caches(network):
            return call(), state.called(length)
        cached_logits_BLV, cached_tokens_BL = state.cache
        stale = jnp.any(cached_tokens_BL != state.tokens_BL)
        logits_BLV = lax.cond(stale, call, lambda: cached_logits_BLV)
        return logits_BLV, state.called(length, stale).replace(cache=(logits_BLV,
                                                                      state.tokens_BL))

    def blocks(self, state: SamplerState, open_BL: jax.Array) -> Blocks | None:
        """Each row's semi-autoregressive blocks and update window (None without blocks);
        `open_BL` is `state.open_BL(mask_id)`."""
        if self.block_length is None:
            return None
        length = open_BL.shape[1]
        start_B = jnp.argmax(~state.known_BL, axis=-1)
        block_BL = (jnp.arange(length) - start_B[:, None]) // self.block_length
        active_B = jnp.min(jnp.where(open_BL, block_BL, length), axis=-1).astype(jnp.int32)
        active_start_B = (start_B + active_B * self.block_length).astype(jnp.int32)
        window_start_B = jnp.clip(active_start_B, 0, length - self.window_size(length))
        return Blocks(block_BL=block_BL, active_B=active_B, active_start_B=active_start_B,
                      window_start_B=window_start_B.astype(jnp.int32))


@struct.dataclass
class UnmaskCarry:
    """The rule's own carry when it has a `history` policy: the caches' carry (`base`: an
    approximate KV cache, cached logits, or None) and the step history."""

    base: Any
    history: Any


@struct.dataclass
class Blocks:
    """Each row's semi-autoregressive blocks (counted from its first generable position)."""

    block_BL: jax.Array  # int32 [B, L]: the block of each position
    active_B: jax.Array  # int32 [B]: the first block with an open position (L: none)
    active_start_B: jax.Array  # int32 [B]: its first position
    window_start_B: jax.Array  # int32 [B]: the first position of the update window


def _scope(state: SamplerState, open_BL, scores_BL, blocks: Blocks | None,
           steps: int) -> select.Candidates:
    """Candidates restricted to each row's current scope: all open positions, or those of
    the first block that still has one."""
    batch, length = open_BL.shape
    generable_BL = ~state.known_BL
    no_reveal_B = jnp.zeros((batch,), jnp.float32)
    if blocks is None:
        return select.Candidates(
            scores_BL=scores_BL, eligible_BL=open_BL,
            step_in_scope_B=jnp.full((batch,), state.step, jnp.int32),
            scope_steps_B=jnp.full((batch,), steps, jnp.int32),
            scope_size_B=jnp.sum(generable_BL, axis=-1, dtype=jnp.int32),
            reveal_prob_B=no_reveal_B)
    block_BL, active_B = blocks.block_BL, blocks.active_B
    in_block_BL = block_BL == active_B[:, None]
    num_blocks_B = jnp.max(jnp.where(generable_BL, block_BL, -1), axis=-1) + 1
    block_steps_B = jnp.maximum(steps // jnp.maximum(num_blocks_B, 1), 1)
    # The block started the step after the last commit in an earlier block.
    before_BL = generable_BL & (block_BL < active_B[:, None])
    start_step_B = jnp.max(jnp.where(before_BL, state.commit_step_BL, -1), axis=-1) + 1
    return select.Candidates(
        scores_BL=scores_BL, eligible_BL=open_BL & in_block_BL,
        step_in_scope_B=(state.step - start_step_B).astype(jnp.int32),
        scope_steps_B=block_steps_B.astype(jnp.int32),
        scope_size_B=jnp.sum(generable_BL & in_block_BL, axis=-1, dtype=jnp.int32),
        reveal_prob_B=no_reveal_B)
