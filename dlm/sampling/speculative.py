"""DiffuSpec (Li et al., 2025): speculative decoding of a causal LM, drafted by a masked
diffusion LM (`DiffuSpec`, on a `networks.DraftedCausalLM`).

Each step, from the committed prefix x_<=c (the last committed token at c, the KV cache
holding the positions before it):

1. Draft. The drafter, a bidirectional masked denoiser, runs once on the sequence as it
   stands: the committed prefix, the known (infilling) positions, every other position
   masked, so the K = `draft_len` positions after c are masked and so is everything after
   them. Its distributions q_1..q_K there form a token lattice.
2. Causal-consistency path search (CPS, `CausalPathSearch`). The per-position argmax of a
   bidirectional lattice need not read left to right, so each position keeps its top
   `width` candidates, cut to the smallest set whose probability reaches `mass` (EOS is
   always kept), and a left-to-right beam search of `beams` paths maximises

       S(y_1..y_K) = sum_j [ weight * log q_j(y_j) + (1 - weight) * log r(y_j | x_<=c, y_<j) ]

   where r is a causal proxy. The paper's proxy is a 3-gram KenLM fitted on the task's
   training split; here (`proxy='context'`) it is an n-gram of order `order`, add-alpha
   smoothed, counted on the row's own committed tokens (prompt and generated text: an
   in-context proxy that needs no corpus), or nothing (`proxy='none'`: S is the drafter's
   score alone, the path the per-position argmax). A path ends at its first EOS (the
   paper's early stop): the positions after it are not drafted. So that a path ending early
   does not win by skipping the later positions' terms, it is scored as going on with EOS
   (as a masked diffusion LM pads a finished text), every path over all K positions.
3. Verification. The target is fed the last committed token and the K drafts through its
   KV cache in ONE call (as `jacobi`), which gives its next-token distributions p_1..p_K+1
   after x_<=c, y_<j. Greedy (temperature 0): the drafts are accepted while each equals the
   argmax of its p_j, and p's argmax is committed at the first mismatch (or after the last
   draft): `ar` greedy's tokens. Sampling: the draft is a deterministic function of the
   committed tokens, so the distribution it was drawn from is the point mass q_j = 1[y_j],
   and speculative sampling with that q accepts y_j with probability
   min(1, p_j(y_j) / q_j(y_j)) = p_j(y_j); at the first rejection it draws from
   norm(max(0, p_j - q_j)), p_j without y_j; when every offered draft is accepted it draws
   the next token from p (the bonus). Each committed token is then distributed as p_j given
   everything before it, so the samples follow the AR model's law exactly.
4. Adaptive draft length (ADL, `AdaptiveDraftLength`). Each row offers only its first k
   drafts, k from an exponential moving average of its own accepted draft lengths plus a
   margin, clipped to [min_len, max_len]: long acceptance grows k, rejections shrink it.
   (The paper's controller starts from a moving average of the EOS-aware draft length and
   adds its margin while acceptance keeps up with it; here the EOS awareness is the cut of
   the path at its first EOS, which bounds the accepted length.)

Shapes are static, so the drafter always runs on all L positions and the target on K + 1
fed tokens; ADL masks the drafts past a row's k (they are not offered, so the target's own
token is drawn there). On this engine ADL therefore saves no computation: it only changes
which drafts are offered for acceptance (and an offered draft never lowers the tokens a call
commits), and `token_forwards_B` counts the K + 1 positions actually processed. The paper's
saving comes from shorter drafter and verifier calls, which need dynamic shapes.

Batches: rows share the cache's length, so a step commits the fewest tokens n any running
row produced, as `jacobi` does; a row that produced more commits its first n, all accepted
drafts, and drafts again from there next step. Greedy: every row gets exactly its greedy
output. Sampling: position j of a row is committed iff the row accepted its drafts before j
and every other running row produced at least j tokens. That event is settled before the
row's own accept test at j and is independent of it (the other rows draw with their own
uniforms), so the committed token still has law p_j given the past, and rows stay
independent: the joint of a batch is the product of the rows' AR laws whatever the batch
size (the tests check it at batch 4 and with all 20,000 draws in one batch). A row whose
later tokens were cut redraws them with the next step's fresh key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from dlm.sampling import categorical, kv_reuse, scores, transforms, unmask
from dlm.sampling.state import SamplerState

PROXIES = ("context", "none")


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


@dataclasses.dataclass(frozen=True)
class CausalPathSearch:
    """CPS: the left-to-right draft path through the drafter's lattice (module docstring).

    Attributes:
      width: M, the most candidates a position keeps (the paper's M_max).
      mass: tau, a position keeps the smallest set of its top candidates whose probability
        reaches it (at least one).
      beams: the beam width of the search.
      weight: lambda in [0, 1], the drafter's share of the score; the proxy has 1 - lambda.
      proxy: 'context' (an n-gram counted on the row's committed tokens) or 'none'.
      order: n of the n-gram proxy (2: bigram; the paper's KenLM is a 3-gram).
      smoothing: alpha of the proxy's add-alpha estimate (c(h, v) + alpha) / (c(h) + alpha V);
        a context never seen gives the uniform 1/V, which ranks nothing.
    """

    width: int = 8
    mass: float = 0.8
    beams: int = 3
    weight: float = 0.5
    proxy: str = "context"
    order: int = 2
    smoothing: float = 0.1

    def __post_init__(self):
        _check_int("cps_width", self.width, 1)
        _check_int("cps_beams", self.beams, 1)
        _check_int("cps_order", self.order, 1)
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"cps_mass={self.mass} must lie in (0, 1]")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"cps_weight={self.weight} must lie in [0, 1]")
        if self.proxy not in PROXIES:
            raise ValueError(f"cps_proxy={self.proxy!r}; allowed: {', '.join(PROXIES)}")
        if not self.smoothing > 0:
            raise ValueError(f"smoothing={self.smoothing} must be > 0")

    def lattice(self, log_q_BKV: jax.Array, eos_id: int | None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(tokens_BKM int32, log_q_BKM, keep_BKM bool): each position's top candidates, kept
        while the probability before them is under `mass`; a last slot holds EOS, kept when
        the cut dropped it (M = width, + 1 with an EOS id)."""
        width = min(self.width, log_q_BKV.shape[-1])
        log_q_BKM, tokens_BKM = lax.top_k(log_q_BKV, width)
        q_BKM = jnp.exp(log_q_BKM)
        before_BKM = jnp.cumsum(q_BKM, axis=-1) - q_BKM
        keep_BKM = (before_BKM < self.mass) & (log_q_BKM > -jnp.inf)
        tokens_BKM = tokens_BKM.astype(jnp.int32)
        if eos_id is None:
            return tokens_BKM, log_q_BKM, keep_BKM
        log_q_eos_BK = log_q_BKV[..., eos_id]
        kept_eos_BK = jnp.any(keep_BKM & (tokens_BKM == eos_id), axis=-1)
        return (jnp.concatenate([tokens_BKM, jnp.full_like(tokens_BKM[..., :1], eos_id)], -1),
                jnp.concatenate([log_q_BKM, log_q_eos_BK[..., None]], -1),
                jnp.concatenate([keep_BKM, (~kept_eos_BK & (log_q_eos_BK > -jnp.inf))[..., None]],
                                -1))

    def __call__(self, log_q_BKV: jax.Array, fixed_BK: jax.Array, fixed_tokens_BK: jax.Array,
                 context_BL: jax.Array, context_len, eos_id: int | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """(path_BK int32, drafted_BK bool): the best path and the positions it drafts (up to
        and including its first EOS).

        log_q_BKV: the drafter's log-probabilities at the K positions after the committed
        prefix; fixed_BK: positions whose token is given (known, or past the end), holding
        fixed_tokens_BK on every path; context_BL: the sequence, whose first `context_len`
        (int32 []) positions are committed (the proxy's counts and the paths' history).
        """
        batch, draft_len, vocab_size = log_q_BKV.shape
        tokens_BKM, log_q_BKM, keep_BKM = self.lattice(log_q_BKV, eos_id)
        width = tokens_BKM.shape[-1]
        first_M, last_M = jnp.arange(width) == 0, jnp.arange(width) == width - 1
        fixed_BKM = fixed_BK[..., None]
        tokens_BKM = jnp.where(fixed_BKM, fixed_tokens_BK[..., None], tokens_BKM)
        log_q_BKM = jnp.where(fixed_BKM, 0.0, log_q_BKM)
        keep_BKM = jnp.where(fixed_BKM, first_M, keep_BKM)
        proxy = None if self.proxy == "none" else _ContextNgram(
            self.order, self.smoothing, vocab_size - 1, context_BL, context_len)
        beams = self.beams

        def extend(carry, xs):
            paths_BNK, score_BN, ended_BN = carry
            j, tokens_BM, log_q_BM, keep_BM, fixed_B = xs
            step_BNM = jnp.broadcast_to(log_q_BM[:, None, :], (batch, beams, width))
            if proxy is not None:
                log_r_BNM = proxy(paths_BNK, j, tokens_BM)
                log_r_BNM = jnp.where(fixed_B[:, None, None], 0.0, log_r_BNM)
                mixed_BNM = self.weight * step_BNM + (1.0 - self.weight) * log_r_BNM
                step_BNM = jnp.where(step_BNM > -jnp.inf, mixed_BNM, -jnp.inf)  # weight 0
            # A path that placed its EOS goes on with EOS (the last slot), scored like any
            # token, so that every path is scored over all K positions.
            ended_step_BNM = jnp.where(fixed_B[:, None, None], jnp.where(first_M, 0.0, -jnp.inf),
                                       jnp.where(last_M, step_BNM, -jnp.inf))
            step_BNM = jnp.where(ended_BN[..., None], ended_step_BNM,
                                 jnp.where(keep_BM[:, None, :], step_BNM, -jnp.inf))
            total_BX = (score_BN[..., None] + step_BNM).reshape(batch, beams * width)
            score_BN, pick_BN = lax.top_k(total_BX, beams)
            parent_BN, slot_BN = pick_BN // width, pick_BN % width
            token_BN = jnp.take_along_axis(tokens_BM, slot_BN, axis=1)
            ended_parent_BN = jnp.take_along_axis(ended_BN, parent_BN, axis=1)
            paths_BNK = jnp.take_along_axis(paths_BNK, parent_BN[..., None], axis=1)
            paths_BNK = jnp.where(jnp.arange(draft_len) == j, token_BN[..., None], paths_BNK)
            ended_BN = ended_parent_BN
            if eos_id is not None:
                ended_BN = ended_BN | ((token_BN == eos_id) & ~fixed_B[:, None])
            return (paths_BNK, score_BN, ended_BN), None

        start = (jnp.zeros((batch, beams, draft_len), jnp.int32),
                 jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)[None].repeat(batch, 0),
                 jnp.zeros((batch, beams), bool))
        xs = (jnp.arange(draft_len), *(jnp.moveaxis(x, 1, 0) for x in
                                       (tokens_BKM, log_q_BKM, keep_BKM, fixed_BK)))
        (paths_BNK, _, _), _ = lax.scan(extend, start, xs)
        path_BK = jnp.where(fixed_BK, fixed_tokens_BK, paths_BNK[:, 0])  # top_k sorts: best
        if eos_id is None:
            return path_BK, jnp.ones_like(fixed_BK)
        eos_BK = ((path_BK == eos_id) & ~fixed_BK).astype(jnp.int32)
        return path_BK, (jnp.cumsum(eos_BK, axis=-1) - eos_BK) == 0


@dataclasses.dataclass(frozen=True)
class _ContextNgram:
    """log r(v | the order - 1 tokens before) from n-gram counts over a row's committed tokens
    (positions < context_len), add-alpha smoothed over `num_tokens` tokens."""

    order: int
    smoothing: float
    num_tokens: int
    context_BL: Any
    context_len: Any

    def __call__(self, paths_BNK: jax.Array, j, tokens_BM: jax.Array) -> jax.Array:
        """float32 [B, N, M]: the score of each candidate after each path's first j tokens."""
        context_BL, context_len = self.context_BL, self.context_len
        length = context_BL.shape[1]
        history = self.order - 1
        # windows_O[s] = the token at s + o; a window counts if it lies in the committed part.
        pad_BL = jnp.full_like(context_BL, -2)
        windows = [jnp.concatenate([context_BL[:, o:], pad_BL[:, :o]], axis=1)
                   for o in range(self.order)]
        match_BNL = (jnp.arange(length) + history < context_len)[None, None, :]
        for o in range(history):  # the token `back` positions before the candidate's
            back = history - o
            in_path = j - back
            from_path_BN = jnp.take(paths_BNK, jnp.maximum(in_path, 0), axis=2)
            position = context_len + in_path
            from_prefix_B = jnp.where(position >= 0, jnp.take(
                context_BL, jnp.clip(position, 0, length - 1), axis=1), -1)
            token_BN = jnp.where(in_path >= 0, from_path_BN, from_prefix_B[:, None])
            match_BNL = match_BNL & (windows[o][:, None, :] == token_BN[..., None])
        seen_BN = jnp.sum(match_BNL, axis=-1)
        followed_BNM = jnp.sum(match_BNL[:, :, None, :] & (
            windows[history][:, None, None, :] == tokens_BM[:, None, :, None]), axis=-1)
        return (jnp.log(followed_BNM + self.smoothing)
                - jnp.log(seen_BN + self.smoothing * self.num_tokens)[..., None])


@dataclasses.dataclass(frozen=True)
class AdaptiveDraftLength:
    """ADL: each row's draft length from the moving average of its accepted draft lengths.

    After a step whose draft had a accepted tokens, the average becomes
    (1 - decay) * average + decay * a, and the next draft length is
    clip(floor(average) + margin, min_len, max_len). The average starts at max_len, so the
    first draft is max_len long. A fully accepted draft makes the next one longer when
    decay * margin >= 1 (the defaults: 0.5 * 2); drafts rejected early shrink it towards
    max(min_len, margin).

    Attributes:
      min_len, max_len: the bounds of the draft length (max_len: the static window).
      margin: tokens offered beyond the average acceptance (the paper's delta).
      decay: rho in (0, 1], the weight of the latest acceptance.
    """

    min_len: int = 2
    max_len: int = 8
    margin: int = 2
    decay: float = 0.5

    def __post_init__(self):
        _check_int("min_draft_len", self.min_len, 1)
        _check_int("draft_len", self.max_len, 1)
        _check_int("adl_margin", self.margin, 0)
        if self.min_len > self.max_len:
            raise ValueError(f"min_draft_len={self.min_len} must be <= draft_len="
                             f"{self.max_len}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"adl_decay={self.decay} must lie in (0, 1]")

    def init(self, batch: int) -> jax.Array:
        """float32 [B]: the average before the first step."""
        return jnp.full((batch,), self.max_len, jnp.float32)

    def draft_len(self, average_B: jax.Array) -> jax.Array:
        """int32 [B]: the draft length of the next step."""
        raw_B = jnp.floor(average_B).astype(jnp.int32) + self.margin
        return jnp.clip(raw_B, self.min_len, self.max_len)

    def update(self, average_B: jax.Array, accepted_B: jax.Array) -> jax.Array:
        """float32 [B]: the average after a step that accepted `accepted_B` draft tokens."""
        return ((1.0 - self.decay) * average_B + self.decay * accepted_B).astype(jnp.float32)


@struct.dataclass
class DiffuSpecCarry:
    kv: Any  # the target's cache: the positions before the last committed token
    average_B: jax.Array  # float32 [B]: ADL's moving average of accepted draft lengths
    drafter: Any = None  # the drafter's approximate KV cache (`kv_reuse.ReuseCarry`), or None


@dataclasses.dataclass(frozen=True)
class DiffuSpec:
    """The DiffuSpec step rule (module docstring); build it with the `diffuspec` recipe.

    Attributes:
      draft_len: K, the static draft window (ADL's max_len when adaptive).
      search: the causal-consistency path search.
      adl: the adaptive draft length, or None: always K drafts.
      greedy: verify greedily (temperature 0) rather than by speculative sampling.
      transforms: the target's logits transforms (temperature, top-k/p, EOS suppression):
        the law the samples follow.
      draft_transforms: the drafter's (EOS suppression).
      gumbel_dtype: of the draws and acceptance uniforms (see `categorical`).
      judge: AR-guided unmasking (FreeCache's guided diffusion; greedy only): the target is
        a judge of the drafter's tokens, which are accepted while the judge gives each
        probability >= judge (or ranks it first); the judge's argmax replaces the first one
        it rejects. None: DiffuSpec's verification (the output is the target's); 1.0: the
        same tokens as greedy DiffuSpec.
      drafter_kv: an approximate KV cache policy for the drafter (`kv_reuse`; None: a full
        forward each step): the draft window is its update window, in virtual blocks of K
        positions (a refresh when the window enters a new one, and on the policy's
        `every`). The drafts change, the verification does not: the output is the same.
    """

    draft_len: int = 8
    search: CausalPathSearch = CausalPathSearch()
    adl: AdaptiveDraftLength | None = AdaptiveDraftLength()
    greedy: bool = False
    transforms: tuple = ()
    draft_transforms: tuple = ()
    gumbel_dtype: str | None = None
    judge: float | None = None
    drafter_kv: Any = None

    network_kind: ClassVar[str] = "denoiser+causal"
    uses_prefix: ClassVar[bool] = True

    def __post_init__(self):
        _check_int("draft_len", self.draft_len, 1)
        if self.adl is not None and self.adl.max_len != self.draft_len:
            raise ValueError(f"the ADL's max_len={self.adl.max_len} must be the draft window "
                             f"draft_len={self.draft_len}")
        categorical.resolve_dtype(self.gumbel_dtype)
        if self.judge is not None and not (self.greedy and 0.0 < self.judge <= 1.0):
            raise ValueError(f"judge={self.judge!r}: AR-guided unmasking is greedy (temperature "
                             "0) with a judge threshold in (0, 1]")

    def max_steps(self, length: int, prefix_len: int) -> int:
        return length - max(prefix_len, 1)  # at least one token per step

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        batch, length = state.tokens_BL.shape
        target = network.target
        kv = target.init_cache_fn(batch, length + self.draft_len + 1)  # a window past L
        if prefix_len > 1:
            _, kv = target.decode_fn(params["target"], state.tokens_BL[:, :prefix_len - 1], kv)
            state = state.called(prefix_len - 1)
        average_B = (self.adl.init(batch) if self.adl is not None
                     else jnp.full((batch,), self.draft_len, jnp.float32))
        drafter = (None if self.drafter_kv is None
                   else kv_reuse.init(network.drafter, batch, length))
        return state.replace(cache=DiffuSpecCarry(kv=kv, average_B=average_B, drafter=drafter))

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        k = self.draft_len
        vocab = network.vocab
        batch, length = state.tokens_BL.shape
        carry: DiffuSpecCarry = state.cache
        fed_at = carry.kv.length  # the position of the last committed token, fed first
        rows_B1 = jnp.arange(batch)[:, None]
        draft_pos_BK = fed_at + 1 + jnp.arange(k, dtype=jnp.int32)[None]
        inside_BK = draft_pos_BK < length
        clipped_BK = jnp.minimum(draft_pos_BK, length - 1)
        known_BK = inside_BK & state.known_BL[rows_B1, clipped_BK]
        fixed_tokens_BK = jnp.where(inside_BK, state.tokens_BL[rows_B1, clipped_BK], 0)
        fixed_BK = known_BK | ~inside_BK  # never drafted: known, or past the end

        # 1-2. One drafter forward on the sequence as it stands, then CPS on its window.
        draft_logits_BKV, drafter, state = self._draft_logits(network, params, state,
                                                              clipped_BK)
        log_q_BKV = transforms.log_probs(draft_logits_BKV, self.draft_transforms, vocab)
        path_BK, drafted_BK = self.search(log_q_BKV, fixed_BK, fixed_tokens_BK,
                                          state.tokens_BL, fed_at + 1, vocab.eos_id)
        draft_len_B = (self.adl.draft_len(carry.average_B) if self.adl is not None
                       else jnp.full((batch,), k, jnp.int32))
        offered_BK = drafted_BK & ~fixed_BK & (jnp.arange(k)[None] < draft_len_B[:, None])

        # 3. One target call on the last committed token and the K drafts.
        fed_BK1 = jnp.concatenate([state.tokens_BL[:, fed_at][:, None], path_BK], axis=1)
        logits_BK1V, kv = network.target.decode_fn(params["target"], fed_BK1, carry.kv)
        if logits_BK1V.shape[-1] != draft_logits_BKV.shape[-1]:
            raise ValueError(f"the drafter's logits cover {draft_logits_BKV.shape[-1]} tokens, "
                             f"the target's {logits_BK1V.shape[-1]}: they must share one "
                             "vocabulary")
        log_p_BK1V = transforms.log_probs(logits_BK1V, self.transforms, vocab)
        accept_BK, emitted_BK1 = self._verify(log_p_BK1V, path_BK, offered_BK, known_BK, key)
        accepted_B = jnp.sum(jnp.cumprod(accept_BK, axis=-1), axis=-1).astype(jnp.int32)
        produced_B = jnp.minimum(accepted_B + 1, length - 1 - fed_at)
        produced = jnp.min(jnp.where(state.done_B, k + 1, produced_B)).astype(jnp.int32)

        # Commit the first `produced` tokens of every row; positions past the end dropped.
        pos_BK1 = fed_at + 1 + jnp.arange(k + 1, dtype=jnp.int32)[None]
        commit_BK1 = jnp.broadcast_to(jnp.arange(k + 1)[None] < produced, pos_BK1.shape)
        commit_BL = jnp.zeros((batch, length), bool).at[rows_B1, pos_BK1].set(
            commit_BK1, mode="drop")
        tokens_BL = state.tokens_BL.at[rows_B1, pos_BK1].set(emitted_BK1, mode="drop")
        confidence_BK1 = scores.Probability()(log_p_BK1V, emitted_BK1, None)
        confidence_BL = jnp.zeros((batch, length), jnp.float32).at[rows_B1, pos_BK1].set(
            confidence_BK1, mode="drop")
        state = state.committed(commit_BL & state.open_BL(vocab.mask_id), tokens_BL,
                                confidence_BL)
        open_B = jnp.sum(state.open_BL(vocab.mask_id), axis=-1)
        generable_B = jnp.maximum(jnp.sum(~state.known_BL, axis=-1), 1)

        # 4. ADL: each row's own acceptance moves its next draft length.
        average_B = carry.average_B
        if self.adl is not None:
            average_B = jnp.where(state.done_B, average_B,
                                  self.adl.update(average_B, accepted_B))
        carry = DiffuSpecCarry(kv=kv.replace(length=fed_at + produced), average_B=average_B,
                               drafter=drafter)
        state = state.called(k + 1)  # the target's K + 1 (the drafter's: `_draft_logits`)
        return state.replace(cache=carry, t_B=(open_B / generable_B).astype(jnp.float32))

    def _draft_logits(self, network, params, state: SamplerState, clipped_BK: jax.Array
                      ) -> tuple[jax.Array, Any, SamplerState]:
        """(the drafter's logits at the draft positions clipped_BK [B, K, V], its cache
        carry, the state with the call counted): a full forward, or a partial call through
        the drafter's approximate KV cache on the window of K positions after the last
        committed one (the last K of the sequence near its end)."""
        carry: DiffuSpecCarry = state.cache
        batch, length = state.tokens_BL.shape
        drafter = network.drafter
        if self.drafter_kv is None:
            logits_BLV = drafter.apply_fn(params["drafter"], state.tokens_BL, state.t_B)
            logits_BKV = jnp.take_along_axis(logits_BLV, clipped_BK[..., None], axis=1)
            return logits_BKV, None, state.called(length)
        window = min(self.draft_len, length)
        first = carry.kv.length + 1  # the first draft position
        start_B = jnp.full((batch,), jnp.minimum(first, length - window), jnp.int32)
        block_B = jnp.full((batch,), first // window, jnp.int32)
        blocks = unmask.Blocks(block_BL=jnp.zeros_like(state.tokens_BL), active_B=block_B,
                               active_start_B=block_B * window, window_start_B=start_B)
        logits_BWV, sub = kv_reuse.cached_logits(
            self.drafter_kv, drafter, params["drafter"], state.replace(cache=carry.drafter),
            blocks, window, network.vocab.mask_id)
        at_BK = jnp.clip(clipped_BK - start_B[:, None], 0, window - 1)
        logits_BKV = jnp.take_along_axis(logits_BWV, at_BK[..., None], axis=1)
        return logits_BKV, sub.cache, sub.replace(cache=carry)

    def _verify(self, log_p_BK1V, draft_BK, offered_BK, known_BK, key
                ) -> tuple[jax.Array, jax.Array]:
        """(accept_BK bool, emitted_BK1 int32): whether each draft is accepted (known
        positions always are), and the token each position gets if it is the first not
        accepted (or, at K, the bonus): the draft where accepted, else a draw."""
        k = draft_BK.shape[1]
        log_p_BKV = log_p_BK1V[:, :k]
        if self.greedy:
            best_BK1 = jnp.argmax(log_p_BK1V, axis=-1).astype(jnp.int32)
            approved_BK = draft_BK == best_BK1[:, :k]
            if self.judge is not None:  # AR-guided: the judge approves probable drafts too
                log_p_draft_BK = jnp.take_along_axis(log_p_BKV, draft_BK[..., None], -1)[..., 0]
                approved_BK |= log_p_draft_BK >= jnp.log(self.judge)
            accept_BK = known_BK | (offered_BK & approved_BK)
            emitted_BK = jnp.where(accept_BK, draft_BK, best_BK1[:, :k])
            return accept_BK, jnp.concatenate([emitted_BK, best_BK1[:, k:]], axis=1)
        accept_key, draw_key = jax.random.split(key)
        log_p_draft_BK = jnp.take_along_axis(log_p_BKV, draft_BK[..., None], -1)[..., 0]
        passed_BK = self._log_uniform(accept_key, draft_BK.shape,
                                      self._log_acceptance(log_p_draft_BK))
        # Where a draft is offered, a rejection draws from the residual; elsewhere from p.
        draw_from_BKV = jnp.where(offered_BK[..., None],
                                  self._residual(log_p_BKV, draft_BK), log_p_BKV)
        drawn_BK1 = categorical.sample_categorical(
            draw_key, jnp.concatenate([draw_from_BKV, log_p_BK1V[:, k:]], axis=1),
            categorical.resolve_dtype(self.gumbel_dtype))
        accept_BK = known_BK | (offered_BK & passed_BK)
        emitted_BK = jnp.where(accept_BK, draft_BK, drawn_BK1[:, :k])
        return accept_BK, jnp.concatenate([emitted_BK, drawn_BK1[:, k:]], axis=1)

    def _log_acceptance(self, log_p_draft_BK: jax.Array) -> jax.Array:
        """log min(1, p(y) / q(y)) with q the point mass at the drafted y: log p(y)."""
        return log_p_draft_BK

    def _residual(self, log_p_BKV: jax.Array, draft_BK: jax.Array) -> jax.Array:
        """log norm(max(0, p - q)), unnormalised, q the point mass at the drafted y: p
        without y (never drawn from when p(y) = 1, as y is then always accepted)."""
        is_draft_BKV = jnp.arange(log_p_BKV.shape[-1]) == draft_BK[..., None]
        return jnp.where(is_draft_BKV, -jnp.inf, log_p_BKV)

    def _log_uniform(self, key: jax.Array, shape: tuple[int, ...], log_threshold: jax.Array
                     ) -> jax.Array:
        """bool [shape]: log u < log_threshold for uniforms u in (0, 1), in float64 where
        `gumbel_dtype` resolves to it."""
        if categorical.resolve_dtype(self.gumbel_dtype) == "float32":
            u = jax.random.uniform(key, shape, jnp.float32,
                                   minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
            return jnp.log(u) < log_threshold
        u = categorical.uniform_float64(key, shape)
        with jax.enable_x64(True):
            return jnp.log(u) < lax.convert_element_type(log_threshold, np.float64)
