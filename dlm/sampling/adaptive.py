"""Adaptive decoding policies of the masked-diffusion rule: when to stop early, which
committed tokens to take back, and credit from the steps before (dInfer's `Credit`, the
rule's step-history carry `History`).

*Early exit* (`EarlyExit`): Prophet (Li et al., 2025, "Diffusion language models know the
answer before decoding") and SchED (Mohamed et al., 2025, "Fast-decoding diffusion language
models via progress-aware confidence schedules") both average the top-1 minus top-2 logit
margin over the positions still to decode and, once it clears a threshold that falls with
the decoding's progress p, commit every one of them at once with the step's proposals ("go
all-in"; for SchED, halt). Both papers take p = step / steps of a decode that commits one
token per step over the generated span; here p is the share of a row's generable
positions decoded, counting the step's first commit, which is the same there and stays
meaningful when `steps` defaults to the whole length or a threshold rule commits several
positions a step. They differ in the schedule: Prophet's
is piecewise (7.5 / 5 / 2.5 for p < 1/3, < 2/3, after: its code's defaults, the middle one
the mean of the others), SchED's is
smooth (linear, cosine or exponential from `high` to `low`).

*Remasking* (`RunningConfidence`, `Backtrack`): after a step's commits the rule may re-open
committed positions of its current scope (the block), within a budget: at most
`per_step` per step and `total` per sample, never a known position, and never where the
re-opened positions could not be committed again within the rule's step budget (see
`unmask.Unmask.update`), so every run still ends within `max_steps`. A policy gives a
*keep score* per committed position (lowest re-masked first) and which positions it would
re-mask at all.

- `RunningConfidence` (RCR, from MDPO, He et al., 2025): commit `per_step` positions beyond
  the select policy's, then re-mask the `per_step` committed positions of the scope with the
  lowest confidence they were committed with, so the scope holds the schedule's count of
  the most confident tokens seen over time. MDPO's code commits all the block's remaining
  share each step and re-masks back to the schedule (`per_step` large); a budget of 0 is
  the base sampler exactly.
- `Backtrack` (Saber's backtracking, Dong et al., 2025): re-mask committed positions whose
  token's probability under the current logits has fallen below `threshold`, lowest first.
  The current probability is the network's raw prediction at a committed position: dlm's
  MDLM loss (SUBS) never scores those (the reverse process carries committed tokens over),
  so on an MDLM network it judges tokens by outputs the training never shaped.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from dlm.sampling import select

EXIT_SCHEDULES = ("prophet", "linear", "cosine", "exp")
EXIT_SPANS = ("all", "content")
EXIT_AGGREGATES = ("mean", "min")


@dataclasses.dataclass(frozen=True)
class EarlyExit:
    """Commit every remaining position once the mean top-2 logit margin clears a
    progress-dependent threshold.

    Attributes:
      schedule: 'prophet' (piecewise: `high` for p < 1/3, their mean for p < 2/3, `low`
        after),
        or SchED's 'linear' (high + (low - high) p), 'cosine' (low + (high - low)
        (1 + cos(pi p)) / 2) or 'exp' (low + (high - low) exp(-k p)).
      high, low: the thresholds, in nats of logit margin; an
        infinite threshold never fires (a margin is infinite where the network puts all its
        mass on one token).
      k: the exponential schedule's rate.
      span: the positions the margin is averaged over: 'all' that are still to decode (the
        papers'), or 'content': those whose top-1 is not the end-of-text (EOS / pad) fill,
        unless every one is. With fixed-length decoding most of the open positions are
        the fill after the answer, predicted with large margins, and their mean clears
        the threshold at the first step (measured on the task models, see BENCHMARKS.md).
      aggregate: 'mean' of the margins over the span (the papers' default) or their 'min'
        (every position left must clear the threshold: a few ambiguous positions among
        many confident ones keep the mean above it, as sudoku's undetermined cells do).
    """

    schedule: str = "prophet"
    high: float = 7.5
    low: float = 2.5
    k: float = 4.0
    span: str = "all"
    aggregate: str = "mean"

    def __post_init__(self):
        if self.schedule not in EXIT_SCHEDULES:
            raise ValueError(f"early_exit={self.schedule!r}; allowed: none, "
                             f"{', '.join(EXIT_SCHEDULES)}")
        if self.aggregate not in EXIT_AGGREGATES:
            raise ValueError(f"exit_aggregate={self.aggregate!r}; allowed: "
                             f"{', '.join(EXIT_AGGREGATES)}")
        if self.span not in EXIT_SPANS:
            raise ValueError(f"exit_span={self.span!r}; allowed: {', '.join(EXIT_SPANS)}")
        if not self.high >= self.low:
            raise ValueError(f"exit thresholds high={self.high} < low={self.low}: the "
                             "schedule must not increase")

    def threshold(self, progress: jax.Array) -> jax.Array:
        """float32: the threshold at progress p in [0, 1]."""
        p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
        high, low = self.high, self.low
        if self.schedule == "prophet":
            return jnp.where(p < 1 / 3, high, jnp.where(p < 2 / 3, 0.5 * (high + low), low))
        if self.schedule == "linear":
            return high + (low - high) * p
        if self.schedule == "cosine":
            return low + (high - low) * 0.5 * (1.0 + jnp.cos(math.pi * p))
        return low + (high - low) * jnp.exp(-self.k * p)

    def __call__(self, log_probs_BLV: jax.Array, span_BL: jax.Array,
                 progress: jax.Array, fill_ids: tuple[int, ...] = ()) -> jax.Array:
        """bool [B]: the rows whose mean margin over `span_BL` (the positions still to
        decode) clears the threshold; rows with an empty span never exit. `log_probs_BLV`
        are the network's log-probabilities, before any temperature / top-k / top-p;
        `fill_ids` the end-of-text ids the 'content' span leaves out."""
        top2_BL2, top2_ids_BL2 = lax.top_k(log_probs_BLV, 2)
        if self.span == "content" and fill_ids:
            content_BL = span_BL & ~jnp.isin(top2_ids_BL2[..., 0], jnp.asarray(fill_ids))
            span_BL = jnp.where(jnp.any(content_BL, axis=-1, keepdims=True), content_BL,
                                span_BL)
        margin_BL = top2_BL2[..., 0] - top2_BL2[..., 1]
        count_B = jnp.sum(span_BL, axis=-1)
        if self.aggregate == "min":
            value_B = jnp.min(jnp.where(span_BL, margin_BL, jnp.inf), axis=-1)
        else:
            value_B = (jnp.sum(jnp.where(span_BL, margin_BL, 0.0), axis=-1)
                       / jnp.maximum(count_B, 1))
        threshold = self.threshold(progress)
        return (count_B > 0) & (value_B >= threshold) & jnp.isfinite(threshold)


@dataclasses.dataclass(frozen=True)
class RunningConfidence:
    """RCR: over-commit then re-mask the committed positions of lowest commit confidence."""

    per_step: int = 1
    total: int = 1 << 20
    over_commits = True  # commits as many extra positions as it may re-mask
    takes_new = True  # this step's commits may be re-masked (the over-committed ones)

    def keep_scores(self, state, current_BL):
        """float32 [B, L]: the confidence each token was committed with."""
        del current_BL
        return state.confidence_BL

    def wants(self, state, current_BL):
        del current_BL
        return jnp.ones_like(state.known_BL)


@dataclasses.dataclass(frozen=True)
class Backtrack:
    """Saber's backtracking: re-mask committed tokens now below `threshold`."""

    threshold: float = 0.1
    per_step: int = 1
    total: int = 1 << 20
    over_commits = False
    takes_new = False  # a token committed this step is judged from the next step's logits

    def keep_scores(self, state, current_BL):
        """float32 [B, L]: each committed token's probability under this step's logits."""
        del state
        return current_BL

    def wants(self, state, current_BL):
        del state
        return current_BL < self.threshold


@struct.dataclass
class History:
    """A step-history carry of the rule's own (static-shaped): dInfer's credit matrix over
    the update window, and the window it belongs to."""

    credit_BWV: jax.Array  # float32 [B, W, V]
    scope_B: jax.Array  # int32 [B]: the window's first position (-1: none yet)


@dataclasses.dataclass(frozen=True)
class Credit:
    """dInfer's credit decoding: a per-window credit matrix C [B, W, V] decays by `beta`
    each step and gains p^gamma at each open position's current top-1 token (p its
    probability); the step then decodes from logits + alpha * log(1 + C), so a prediction
    that stays on top across steps gains confidence. The credit restarts when the window
    moves (a new block)."""

    alpha: float = 0.7
    gamma: float = 0.2
    beta: float = 0.8

    def init(self, batch: int, width: int, vocab: int) -> History:
        return History(credit_BWV=jnp.zeros((batch, width, vocab), jnp.float32),
                       scope_B=jnp.full((batch,), -1, jnp.int32))

    def fuse(self, history: History, logits_BWV: jax.Array, log_probs_BWV: jax.Array,
             open_BW: jax.Array, scope_B: jax.Array) -> tuple[jax.Array, History]:
        """(fused logits [B, W, V], the carry after this step). `log_probs_BWV` are the
        network's own (mask id excluded), `open_BW` the positions still to decode."""
        fresh_B = history.scope_B != scope_B
        credit = jnp.where(fresh_B[:, None, None], 0.0, self.beta * history.credit_BWV)
        top_BW = jnp.argmax(log_probs_BWV, axis=-1)
        gain_BW = jnp.where(open_BW, jnp.exp(jnp.max(log_probs_BWV, axis=-1)) ** self.gamma,
                            0.0)
        credit = credit + jax.nn.one_hot(top_BW, credit.shape[-1]) * gain_BW[..., None]
        fused = logits_BWV.astype(jnp.float32) + self.alpha * jnp.log1p(credit)
        return fused, History(credit_BWV=credit, scope_B=scope_B.astype(jnp.int32))


def credit_policy(alpha: float, gamma: float, beta: float) -> Credit | None:
    """The credit policy of the samplers' `credit_alpha` options (None for alpha 0)."""
    for name, value in (("credit_alpha", alpha), ("credit_gamma", gamma),
                        ("credit_beta", beta)):
        if not value >= 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if not beta <= 1:
        raise ValueError(f"credit_beta={beta} must lie in [0, 1]")
    return Credit(float(alpha), float(gamma), float(beta)) if alpha > 0 else None


REMASK = {"rcr": RunningConfidence, "backtrack": Backtrack}


def check_budget(per_step, total) -> None:
    for name, value in (("remask_per_step", per_step), ("remask_total", total)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r} must be an int >= 0")


def lowest(scores_BL: jax.Array, allowed_BL: jax.Array, count_B: jax.Array) -> jax.Array:
    """bool [B, L]: the `count_B` allowed positions of lowest score in each row (ties: the
    leftmost first)."""
    return allowed_BL & (select.rank(-scores_BL, allowed_BL) < count_B[:, None])


def remask_policy(name: str, per_step: int, total: int | None, threshold: float):
    """The remasking policy of the samplers' `remask` options (None for 'none'; every
    option is checked either way)."""
    if name != "none" and name not in REMASK:
        raise ValueError(f"remask={name!r}; allowed: none, {', '.join(REMASK)}")
    check_budget(per_step, 0 if total is None else total)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"remask_threshold={threshold} must lie in (0, 1]")
    if name == "none":
        return None
    total = (1 << 20) if total is None else total
    if name == "backtrack":
        return Backtrack(float(threshold), per_step, total)
    return RunningConfidence(per_step, total)


def exit_policy(name: str, high: float | None, low: float | None, span: str = "all",
                aggregate: str = "mean"):
    """The early-exit policy of the samplers' `early_exit` options (None for 'none'; every
    option is checked either way); `high`/`low` None keep the schedule's defaults
    (Prophet's 7.5 / 2.5)."""
    values = {k: float(v) for k, v in (("high", high), ("low", low)) if v is not None}
    policy = EarlyExit("prophet" if name == "none" else name, span=span, aggregate=aggregate,
                       **values)
    return None if name == "none" else policy

