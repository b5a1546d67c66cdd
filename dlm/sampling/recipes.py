"""Named samplers: the published algorithms as policies on the one engine.

A recipe is a function `(decoding, **its own options) -> step rule`, registered under its
name by `@recipe(name)`: the registry (`SAMPLERS`) is the one list of sampler names, and
the kind of network each one samples is its rule's `network_kind`. The options every recipe
shares, how tokens are drawn and when a sample ends, are `Decoding`'s, defined once; a recipe
may change their defaults (`@recipe("llada", temperature=0.0)`), as it may its own
(`recipe("ddpm_cache", mdlm, cache_logits=True)`). `get_sampler(name, **overrides)` builds
a `Sampler`; `options(name)` lists what it takes. Adding a sampler: a recipe function here
(and its step rule's module when it needs a new rule).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

from dlm.registry import Registry
from dlm.sampling import adaptive as adaptive_lib
from dlm.sampling import categorical, kv_reuse, scores, select, times, transforms
from dlm.sampling.block_unmask import BlockUnmask
from dlm.sampling.engine import Sampler, StepRule
from dlm.sampling.freedave import FreeDave
from dlm.sampling.importance import ImportanceUnmask
from dlm.sampling.jacobi import Jacobi
from dlm.sampling.next_token import NextToken
from dlm.sampling.speculative import AdaptiveDraftLength, CausalPathSearch, DiffuSpec
from dlm.sampling.stop import Stop
from dlm.sampling.unmask import Unmask


@dataclasses.dataclass(frozen=True)
class Decoding:
    """The options every recipe shares.

    Attributes:
      temperature: of the token draws; 0 is greedy (the argmax).
      top_k: draw among the k most likely tokens only (0: off).
      top_p: draw from the nucleus of probability p only (1: off).
      gumbel_dtype: the noise of categorical draws, 'float32' or 'float64' (None: float64
        on cpu/gpu, float32 elsewhere; see `categorical`).
      stop_at_eos: a sample ends at its first generated EOS (variable length).
      eos_fill: what fills the positions after it: 'eos' or 'pad'.
      suppress_eos: never propose EOS (fixed-length generation).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gumbel_dtype: str | None = None
    stop_at_eos: bool = False
    eos_fill: str = "eos"
    suppress_eos: bool = False

    def __post_init__(self):  # each raises ValueError naming the bad option
        categorical.resolve_dtype(self.gumbel_dtype)
        transforms.standard(self.temperature, self.top_k, self.top_p, self.suppress_eos)
        Stop(self.stop_at_eos, self.eos_fill)

    @property
    def chain(self) -> tuple:
        """The logits transforms, in the standard order (see `transforms.standard`)."""
        return transforms.standard(self.temperature, self.top_k, self.top_p, self.suppress_eos)

    @property
    def proposal(self) -> categorical.Categorical | categorical.Greedy:
        """Greedy at temperature 0, a categorical draw otherwise."""
        return categorical.proposal_for(self.temperature, self.gumbel_dtype)

    @property
    def stop(self) -> Stop:
        return Stop(self.stop_at_eos, self.eos_fill)

    def unmask(self, **policies) -> Unmask:
        """A masked-diffusion rule with these transforms and proposal, and `policies`."""
        return Unmask(proposal=self.proposal, transforms=self.chain, **policies)


DECODING_OPTIONS = tuple(field.name for field in dataclasses.fields(Decoding))


@dataclasses.dataclass(frozen=True)
class Adaptive:
    """The adaptive-decoding options of the recipes that decode with the masked-diffusion
    rule and take `adaptive_options` (see `dlm.sampling.adaptive`): early exit, remasking
    and credit decoding.

    Attributes:
      early_exit: 'none', 'prophet' (Prophet's piecewise schedule), or SchED's 'linear',
        'cosine', 'exp': commit every remaining position once the mean top-2 logit margin
        over them clears the schedule's threshold at the decoding's progress.
      exit_high, exit_low: the schedule's first and last thresholds (None: 7.5 and 2.5, in
        nats of margin; Prophet's middle one is their mean; inf: never exits).
      exit_span: 'all' positions still to decode (the papers') or 'content': those not
        predicted to be the end-of-text fill (see `adaptive.EarlyExit`).
      exit_aggregate: 'mean' (the papers') or 'min' of the margins over the span.
      remask: 'none', 'rcr' (MDPO's running-confidence remasking) or 'backtrack' (Saber's:
        committed tokens whose probability fell below `remask_threshold`).
      remask_per_step, remask_total: the budget: re-opened positions per step and per
        sample (None: unbounded); 0 is the sampler without remasking, exactly.
      remask_threshold: backtrack's probability threshold.
      credit_alpha, credit_gamma, credit_beta: dInfer's credit decoding (`adaptive.Credit`):
        each step decodes from logits + alpha log(1 + C), C the window's credit (decayed by
        beta, plus p^gamma at each open position's top-1); alpha 0: off.
    """

    early_exit: str = "none"
    exit_high: float | None = None
    exit_low: float | None = None
    exit_span: str = "all"
    exit_aggregate: str = "mean"
    remask: str = "none"
    remask_per_step: int = 1
    remask_total: int | None = None
    remask_threshold: float = 0.1
    credit_alpha: float = 0.0
    credit_gamma: float = 0.2
    credit_beta: float = 0.8

    def __post_init__(self):  # each raises ValueError naming the bad option
        self.policies()

    def policies(self) -> dict:
        """{'exit': ..., 'remask': ..., 'history': ...}: the policies for `unmask.Unmask`."""
        return {"exit": adaptive_lib.exit_policy(self.early_exit, self.exit_high,
                                                 self.exit_low, self.exit_span,
                                                 self.exit_aggregate),
                "remask": adaptive_lib.remask_policy(self.remask, self.remask_per_step,
                                                     self.remask_total, self.remask_threshold),
                "history": adaptive_lib.credit_policy(self.credit_alpha, self.credit_gamma,
                                                      self.credit_beta)}


ADAPTIVE_OPTIONS = tuple(field.name for field in dataclasses.fields(Adaptive))


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """A registered sampler: `build(decoding, **own options) -> step rule` and the defaults
    of every option it takes, its own first, then `Decoding`'s."""

    name: str
    build: Callable[..., StepRule]
    defaults: dict

    def sampler(self, **overrides) -> Sampler:
        values = {**self.defaults, **overrides}
        decoding = Decoding(**{name: values.pop(name) for name in DECODING_OPTIONS})
        if _takes_adaptive(self.build):
            values["adaptive_options"] = Adaptive(**{name: values.pop(name)
                                                     for name in ADAPTIVE_OPTIONS})
        return Sampler(self.name, self.build(decoding, **values), decoding.stop)


SAMPLERS: Registry[Recipe] = Registry("sampler")


def recipe(name: str, build: Callable[..., StepRule] | None = None, **defaults):
    """Registers `build(decoding, **options) -> step rule` as the sampler `name`, with
    `defaults` replacing those of its own options or of `Decoding`'s; without `build`, a
    decorator (returning the function unchanged, so recipes can call each other)."""
    def add(build):
        own = list(inspect.signature(build).parameters.values())[1:]
        values = {p.name: p.default for p in own if p.name != "adaptive_options"}
        if _takes_adaptive(build):
            values.update({field.name: field.default for field in dataclasses.fields(Adaptive)})
        values.update({field.name: field.default for field in dataclasses.fields(Decoding)})
        unknown = sorted(set(defaults) - set(values))
        if unknown:
            raise TypeError(f"recipe {name!r}: no option {', '.join(unknown)}")
        SAMPLERS.register(name, Recipe(name, build, {**values, **defaults}))
        return build

    return add if build is None else add(build)


def _takes_adaptive(build) -> bool:
    """Whether a recipe takes the `Adaptive` options (a parameter `adaptive_options`)."""
    return "adaptive_options" in inspect.signature(build).parameters


def _check_positive(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int" +
                         (" or None" if allow_none else ""))


@recipe("mdlm")
def mdlm(decoding: Decoding, steps: int | None = None, eps: float = 1e-5,
         noise_removal: bool = True, cache_logits: bool = False) -> Unmask:
    """MDLM's ancestral sampler: `steps` reverse steps on a uniform time grid from 1 to eps
    (None: one per position), each revealing a masked position with probability
    (alpha_s - alpha_t) / (1 - alpha_t) and drawing its token from p(x_0 | x_t); then, with
    `noise_removal`, one argmax step for what is left (steps + 1 network calls).

    `cache_logits` (the `ddpm_cache` sampler) skips the network while no token changed since
    its last call, for networks that are not time-conditioned: the same samples under the
    same key, fewer calls."""
    _check_positive("steps", steps)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps={eps} must lie in [0, 1)")
    return decoding.unmask(select=select.Reveal(), steps=steps,
                           time=times.GridTime(eps if noise_removal else 0.0),
                           final_greedy=noise_removal, cache_logits=cache_logits)


recipe("ddpm_cache", mdlm, cache_logits=True)


@recipe("first_hitting")
def first_hitting(decoding: Decoding) -> Unmask:
    """First-hitting sampler (Zheng et al., 2024): one uniformly chosen masked position per
    network call, at the exact time it is revealed; L calls for L masks."""
    return decoding.unmask(select=select.FixedCount(1), score=scores.Random(),
                           time=times.FirstHitting())


LLADA_REMASKING = ("low_confidence", "random")


def _kv(cache: str, cache_every: int | None, cache_vicinity: int | None,
        cache_variant: str | None, block_length: int | None):
    """The reuse policy of the block-decoding samplers' cache options (`kv_reuse`)."""
    policy = kv_reuse.by_name(cache, cache_every, cache_vicinity, cache_variant)
    if policy is not None and block_length is None:
        raise ValueError(f"cache={cache!r} decodes in semi-autoregressive blocks: set "
                         "block_length")
    return policy


# The approximate KV cache options of the samplers that decode in blocks (`kv_reuse`):
# cache ('none', 'prefix', 'dual', 'dkv', 'freecache', 'dinfer'), cache_every (refresh
# interval in steps; None: the policy's default, 0: at block starts only), cache_vicinity
# (dinfer: positions recomputed on each side of the block; dkv greedy: after it) and
# cache_variant (dkv: 'decode' or 'greedy').


@recipe("llada", temperature=0.0)
def llada(decoding: Decoding, steps: int | None = None, block_length: int | None = 32,
          remasking: str = "low_confidence", cache: str = "none",
          cache_every: int | None = None, cache_vicinity: int | None = None,
          cache_variant: str | None = None,
          adaptive_options: Adaptive = Adaptive()) -> Unmask:
    """LLaDA: semi-autoregressive blocks of `block_length` (None: one block), `steps` (None:
    one per position) shared evenly between them; each step commits a fixed share of the
    block's masks, the most confident ('low_confidence' remasking) or random ones. `cache`
    (with `cache_every`, `cache_vicinity`, `cache_variant`): an approximate KV cache.
    `Adaptive`'s options: early exit, remasking, credit."""
    _check_positive("steps", steps)
    _check_positive("block_length", block_length)
    score = scores.by_name(remasking, LLADA_REMASKING, option="remasking")
    return decoding.unmask(select=select.ScheduledCount("linear"), score=score, steps=steps,
                           block_length=block_length,
                           kv=_kv(cache, cache_every, cache_vicinity, cache_variant,
                                  block_length), **adaptive_options.policies())


@recipe("dream", temperature=0.2, top_p=0.95)
def dream(decoding: Decoding, steps: int | None = None, alg: str = "entropy",
          block_length: int | None = None, cache: str = "none",
          cache_every: int | None = None, cache_vicinity: int | None = None,
          cache_variant: str | None = None,
          adaptive_options: Adaptive = Adaptive()) -> Unmask:
    """Dream: each of `steps` steps commits masked positions / steps left, ordered by
    `alg`: 'entropy' (lowest entropy first), 'margin' (top-1 minus top-2 probability),
    'confidence' or 'random'; `cache` options as `llada`'s (with `block_length`), and
    `Adaptive`'s."""
    _check_positive("steps", steps)
    _check_positive("block_length", block_length)
    return decoding.unmask(select=select.ScheduledCount("linear"), score=scores.by_name(alg),
                           steps=steps, block_length=block_length,
                           kv=_kv(cache, cache_every, cache_vicinity, cache_variant,
                                  block_length), **adaptive_options.policies())


@recipe("fast_dllm", temperature=0.0)
def fast_dllm(decoding: Decoding, threshold: float = 0.9, factor: float | None = None,
              block_length: int | None = None, cache: str = "none",
              cache_every: int | None = None, cache_vicinity: int | None = None,
              cache_variant: str | None = None,
              adaptive_options: Adaptive = Adaptive()) -> Unmask:
    """Fast-dLLM parallel decoding: commit every masked position whose confidence exceeds
    `threshold` (and always the most confident one), or with `factor` the factor rule;
    optionally within semi-autoregressive blocks, and then with Fast-dLLM's prefix or dual
    `cache` (or the other policies; options as `llada`'s, `Adaptive`'s too)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in (0, 1]")
    if factor is not None and factor <= 0:
        raise ValueError(f"factor={factor} must be > 0 (or None for the threshold rule)")
    _check_positive("block_length", block_length)
    rule_select = select.Threshold(threshold) if factor is None else select.Factor(factor)
    return decoding.unmask(select=rule_select, score=scores.Probability(),
                           block_length=block_length,
                           kv=_kv(cache, cache_every, cache_vicinity, cache_variant,
                                  block_length), **adaptive_options.policies())


@recipe("freedave", temperature=0.0)
def freedave(decoding: Decoding, drafts: int = 4, steps: int | None = None,
             block_length: int | None = 32, remasking: str = "low_confidence") -> FreeDave:
    """FreeDave (Wu & Zhang, 2025): `llada`'s static decode (its `steps`, `block_length`,
    `remasking`; by default one token per step) drafted `drafts` steps ahead from one
    forward and verified by one batched call on the drafts (K = `drafts` sequences per
    call: the compute budget), keeping the longest run of drafts that are the static
    decode's states. The output is `llada`'s under the same key, token for token (greedy or
    not), in at most as many network calls."""
    _check_positive("drafts", drafts, allow_none=False)
    return FreeDave(llada(decoding, steps=steps, block_length=block_length,
                          remasking=remasking), drafts=drafts, stop=decoding.stop)


@recipe("ar")
def ar(decoding: Decoding) -> NextToken:
    """Autoregressive decoding with the KV cache: ancestral at temperature 1, greedy at 0."""
    return NextToken(proposal=decoding.proposal, transforms=decoding.chain)


@recipe("jacobi", temperature=0.0)
def jacobi(decoding: Decoding, window: int = 8, blocks: int = 1, pool: int = 0) -> Jacobi:
    """Jacobi decoding of an AR model (Santilli et al., 2023; the decoder of Jacobi
    Forcing): `window` guesses for the next positions are refined in one call each step and
    every prediction whose guesses before it were right is committed, so the output is
    greedy decoding's (`ar` at temperature 0) exactly, in at most as many calls. Greedy
    only: temperature must be 0. Jacobi Forcing's multi-block decoding refines `blocks`
    windows together; its rejection recycling (`pool` > 0) also verifies, in the same
    batched call, the `pool` latest predicted windows continued from the last committed
    token, keeping the longest accepted run (the output never changes)."""
    _check_positive("window", window, allow_none=False)
    if decoding.temperature != 0:
        raise ValueError(f"jacobi decodes greedily (its fixed point is greedy decoding); "
                         f"temperature={decoding.temperature} must be 0")
    return Jacobi(window=window, transforms=decoding.chain, blocks=blocks, pool=pool)


DIFFUSPEC_ACCEPTANCE = ("auto", "greedy", "speculative")


@recipe("diffuspec")
def diffuspec(decoding: Decoding, draft_len: int = 8, min_draft_len: int = 2,
              adaptive: bool = True, adl_margin: int = 2, adl_decay: float = 0.5,
              cps_width: int = 8, cps_mass: float = 0.8, cps_beams: int = 3,
              cps_weight: float = 0.5, cps_proxy: str = "context", cps_order: int = 2,
              acceptance: str = "auto", cache: str = "none",
              cache_every: int | None = None) -> DiffuSpec:
    """DiffuSpec (Li et al., 2025): speculative decoding of an AR target with a masked
    diffusion drafter, for a `DraftedCausalLM` (see `speculative`). Each step the drafter
    drafts `draft_len` (K) positions in one forward, the causal-consistency path search
    (CPS) picks a left-to-right path through its candidates and the target verifies it in
    one call through its KV cache. The output is `ar`'s: greedy's token for token at
    temperature 0, and exactly the AR model's law otherwise (speculative sampling).

    Options:
      draft_len: K, the static draft window (the most drafts per step).
      min_draft_len: the shortest draft ADL offers.
      adaptive: the adaptive draft length (ADL): each row offers its first
        clip(floor(EMA of accepted lengths) + adl_margin, min_draft_len, draft_len) drafts;
        off, all K. Shapes are static, so ADL saves no computation here (module docstring).
      adl_margin: the tokens offered beyond the average acceptance (delta).
      adl_decay: the EMA's weight of the latest step, in (0, 1] (rho).
      cps_width: the most candidates a position keeps (M_max).
      cps_mass: a position keeps its top candidates until their probability reaches it
        (tau); EOS is always kept.
      cps_beams: the beam width of the path search.
      cps_weight: the drafter's share lambda of the path score, the causal proxy's 1 - lambda.
      cps_proxy: the causal proxy: 'context' (an n-gram counted on the row's committed
        tokens, standing in for the paper's corpus 3-gram) or 'none' (the drafter alone:
        the per-position argmax).
      cps_order: the n of the n-gram proxy.
      acceptance: 'greedy' (the target's argmax; temperature 0), 'speculative' (speculative
        sampling; temperature > 0), or 'auto': greedy at temperature 0, else speculative.
      cache, cache_every: an approximate KV cache for the drafter (`llada`'s `cache`
        options; its window is the draft window, in blocks of K): the drafts change, the
        output does not.
    """
    if acceptance not in DIFFUSPEC_ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}; allowed: {', '.join(DIFFUSPEC_ACCEPTANCE)}")
    if acceptance == "greedy" and decoding.temperature != 0:
        raise ValueError(f"acceptance='greedy' verifies the target's argmax: temperature="
                         f"{decoding.temperature} must be 0 (or use 'speculative')")
    if acceptance == "speculative" and decoding.temperature == 0:
        raise ValueError("acceptance='speculative' samples: temperature=0 must be > 0 (or use "
                         "'greedy')")
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive={adaptive!r} must be True or False")
    _check_positive("draft_len", draft_len, allow_none=False)
    search = CausalPathSearch(width=cps_width, mass=cps_mass, beams=cps_beams,
                              weight=cps_weight, proxy=cps_proxy, order=cps_order)
    adl = AdaptiveDraftLength(min_len=min_draft_len, max_len=draft_len, margin=adl_margin,
                              decay=adl_decay) if adaptive else None
    return DiffuSpec(draft_len=draft_len, search=search, adl=adl,
                     greedy=decoding.temperature == 0, transforms=decoding.chain,
                     draft_transforms=tuple(t for t in decoding.chain
                                            if isinstance(t, transforms.SuppressEos)),
                     gumbel_dtype=decoding.gumbel_dtype,
                     drafter_kv=kv_reuse.by_name(cache, cache_every))


@recipe("ar_guided", temperature=0.0)
def ar_guided(decoding: Decoding, threshold: float = 0.1, draft_len: int = 8,
              cache: str = "none", cache_every: int | None = None) -> DiffuSpec:
    """AR-guided unmasking (FreeCache's guided diffusion, Hu et al., 2025), for a
    `DraftedCausalLM` whose causal LM is a small judge of the masked diffusion model's
    tokens: each step the diffusion model proposes its argmax for the next `draft_len`
    positions in one forward, and the judge, in one call through its KV cache, keeps them
    left to right while it gives each probability >= `threshold` (or ranks it first); its
    own argmax replaces the first it rejects. Fewer diffusion steps than one token per
    call; threshold 1 gives the judge's greedy output exactly (DiffuSpec's greedy
    verification). Greedy: temperature must be 0. `cache`, `cache_every`: the diffusion
    model's approximate KV cache (as `diffuspec`'s)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in (0, 1]")
    if decoding.temperature != 0:
        raise ValueError(f"ar_guided decodes greedily; temperature={decoding.temperature} "
                         "must be 0")
    _check_positive("draft_len", draft_len, allow_none=False)
    return DiffuSpec(draft_len=draft_len, search=CausalPathSearch(proxy="none", beams=1),
                     adl=None, greedy=True, transforms=decoding.chain,
                     draft_transforms=tuple(t for t in decoding.chain
                                            if isinstance(t, transforms.SuppressEos)),
                     gumbel_dtype=decoding.gumbel_dtype, judge=threshold,
                     drafter_kv=kv_reuse.by_name(cache, cache_every))


BLOCK_POLICIES = ("first_hitting", "mdlm", "fixed_count", "threshold")


@recipe("bd3lm")
def bd3lm(decoding: Decoding, block_size: int | None = None, policy: str = "first_hitting",
          steps: int | None = None, threshold: float = 0.9, kv_cache: bool = True,
          window: int | None = None, sub_block: int | None = None,
          cache: str = "none", freedave: int = 0,
          adaptive_options: Adaptive = Adaptive()) -> BlockUnmask | FreeDave:
    """BD3-LM block diffusion (Arriola et al., 2025), for networks trained with blocks: blocks
    of `block_size` (None: the network's; it must equal it) generated left to right, each
    denoised by `policy` given the committed blocks before it:

    - 'first_hitting': one uniformly chosen masked position per network call, at its exact
      first-hitting time (b calls for a block of b masks; takes no `steps`).
    - 'mdlm': MDLM's ancestral steps on a uniform time grid, `steps` per block (None: b),
      then one argmax step for what is left.
    - 'fixed_count': the most confident positions, an even share of the block's masks in
      each of `steps` steps per block (None: b, one per step).
    - 'threshold': every masked position whose confidence exceeds `threshold`, and always the
      most confident one (Fast-dLLM's rule; takes no `steps`).

    With `kv_cache` each committed block is encoded once into a KV cache (one network call)
    and every step runs the network on the current block only; without it every step runs it
    on the whole sequence (the reference: the same samples under the same key; no window).
    `window` (a multiple of b; None: the largest that fits the training context with the
    current block, or everything when the network does not know its context) bounds the
    committed positions in view: the oldest block leaves the cache first, so samples may be
    longer than the training context. The length must be a multiple of b. `stop_at_eos` ends
    a sample at its first EOS (variable length): later blocks are never generated.
    Nucleus / top-k / temperature apply inside blocks as everywhere.

    `sub_block` cuts each block into sub-blocks of that many positions, decoded left to right
    by the policy (Fast-dLLM v2; `steps` are then shared between them); `cache='dual'` adds
    Fast-dLLM v2's sub-block cache: the block's keys/values are cached when a sub-block
    starts and the steps inside it run the sub-block alone.

    `freedave` (K > 0) verifies K drafted steps per call (FreeDave, see the `freedave`
    sampler): the same samples under the same key in fewer calls, the drafts staying in the
    current block (no sub-block cache).

    `Adaptive`'s options act inside each block: an early exit commits the rest of the block;
    remasking re-opens positions of the block (with the 'fixed_count' or 'threshold'
    policy)."""
    _check_positive("block_size", block_size)
    _check_positive("steps", steps)
    _check_positive("window", window)
    _check_positive("sub_block", sub_block)
    if cache not in ("none", "dual"):
        raise ValueError(f"cache={cache!r}; allowed for bd3lm: none, dual (Fast-dLLM v2's "
                         "sub-block cache)")
    if cache == "dual" and (sub_block is None or not kv_cache):
        raise ValueError("cache='dual' (Fast-dLLM v2's sub-block cache) needs sub_block and "
                         "kv_cache=True")
    if policy not in BLOCK_POLICIES:
        raise ValueError(f"policy={policy!r}; allowed: {', '.join(BLOCK_POLICIES)}")
    if steps is not None and policy in ("first_hitting", "threshold"):
        raise ValueError(f"policy {policy!r} takes no steps (it commits by its own rule); use "
                         "policy='mdlm' or 'fixed_count' for a step count")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in (0, 1]")
    if policy == "first_hitting":
        inner = first_hitting(decoding)
    elif policy == "mdlm":
        inner = decoding.unmask(select=select.Reveal(), steps=steps, time=times.GridTime(),
                                final_greedy=True)
    elif policy == "fixed_count":
        inner = decoding.unmask(select=select.ScheduledCount("linear"),
                                score=scores.Probability(), steps=steps)
    else:
        inner = decoding.unmask(select=select.Threshold(threshold), score=scores.Probability())
    rule = BlockUnmask(dataclasses.replace(inner, block_length=sub_block,
                                           **adaptive_options.policies()),
                       block_size=block_size, kv_cache=bool(kv_cache), window=window,
                       sub_cache=cache == "dual")
    if not isinstance(freedave, int) or isinstance(freedave, bool) or freedave < 0:
        raise ValueError(f"freedave={freedave!r} must be an int >= 0 (0: off)")
    return FreeDave(rule, drafts=freedave, stop=decoding.stop) if freedave else rule


@recipe("edlm")
def edlm(decoding: Decoding, num_candidates: int = 4, window_low: float = 0.0,
         window_high: float = 1.0, energy_temperature: float = 1.0,
         steps: int | None = None, eps: float = 1e-5,
         noise_removal: bool = True) -> ImportanceUnmask:
    """EDLM (Xu et al., 2024): MDLM's ancestral sampler (the options after
    `energy_temperature` are `mdlm`'s) whose steps with window_low <= t <= window_high draw
    `num_candidates` full sequences from the denoiser, resample one with probability
    proportional to exp(-E / energy_temperature) under the network's energy (EDLM-AR or
    EDLM-NCE) and reveal positions towards it. num_candidates=1 is `mdlm` exactly."""
    _check_positive("num_candidates", num_candidates, allow_none=False)
    if not 0.0 <= window_low <= window_high <= 1.0:
        raise ValueError(f"window_low={window_low}, window_high={window_high}: need "
                         "0 <= window_low <= window_high <= 1")
    if not energy_temperature > 0:
        raise ValueError(f"energy_temperature={energy_temperature} must be > 0")
    return ImportanceUnmask(mdlm(decoding, steps=steps, eps=eps, noise_removal=noise_removal),
                            num_candidates=num_candidates,
                            window=(float(window_low), float(window_high)),
                            energy_temperature=float(energy_temperature),
                            gumbel_dtype=decoding.gumbel_dtype)


def options(name: str) -> dict:
    """{option: default} of the sampler called `name`: its own options, then the shared
    `Decoding` ones with its defaults."""
    return dict(_recipe(name).defaults)


def get_sampler(name: str, **overrides) -> Sampler:
    """The sampler called `name` with `overrides` of its options.

    Raises ValueError for an unknown name or option (listing the known ones) or a bad value.
    """
    entry = _recipe(name)
    unknown = sorted(set(overrides) - set(entry.defaults))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(entry.defaults)}")
    return entry.sampler(**overrides)


def samplers_for(kind: str) -> tuple[str, ...]:
    """The names of the samplers that take networks of `kind` (`networks.NETWORK_KINDS`; any
    other kind gets none)."""
    return tuple(name for name in SAMPLERS if _network_kind(name) == kind)


@functools.cache
def _network_kind(name: str) -> str:
    """The network kind of sampler `name`, built with its defaults."""
    return get_sampler(name).rule.network_kind


def _recipe(name: str) -> Recipe:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS.get(name)
