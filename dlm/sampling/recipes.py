"""Named samplers: the published algorithms as policies on the one engine.

Every recipe is a function of keyword options returning a `Sampler`; `get_sampler(name,
**overrides)` looks one up (`ddpm_cache` is `mdlm` with `cache_logits=True`). Options shared
by all: temperature (0: greedy), top_k (0: off), top_p (1: off), gumbel_dtype (None: float64
on cpu/gpu), stop_at_eos, eos_fill ('eos' or 'pad'), suppress_eos. Adding a recipe: write a
function here and list it in SAMPLERS.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from dlm.sampling import categorical, scores, select, times, transforms
from dlm.sampling.autoregressive import NextToken
from dlm.sampling.blocks import BlockUnmask
from dlm.sampling.energy import ImportanceUnmask
from dlm.sampling.engine import Sampler
from dlm.sampling.stop import Stop
from dlm.sampling.unmask import Unmask


def _check_positive(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int" +
                         (" or None" if allow_none else ""))


def _common(temperature, top_k, top_p, gumbel_dtype, suppress_eos):
    categorical.resolve_dtype(gumbel_dtype)  # validates
    return (transforms.standard(temperature, top_k, top_p, suppress_eos),
            categorical.proposal_for(temperature, gumbel_dtype))


def mdlm(steps: int | None = None, eps: float = 1e-5, noise_removal: bool = True,
         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         gumbel_dtype: str | None = None, stop_at_eos: bool = False, eos_fill: str = "eos",
         suppress_eos: bool = False, cache_logits: bool = False) -> Sampler:
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
    chain, proposal = _common(temperature, top_k, top_p, gumbel_dtype, suppress_eos)
    rule = Unmask(select=select.Reveal(), proposal=proposal, transforms=chain, steps=steps,
                  time=times.GridTime(eps if noise_removal else 0.0),
                  final_greedy=noise_removal, cache_logits=cache_logits)
    return Sampler("mdlm", rule, Stop(stop_at_eos, eos_fill))


def first_hitting(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  gumbel_dtype: str | None = None, stop_at_eos: bool = False,
                  eos_fill: str = "eos", suppress_eos: bool = False) -> Sampler:
    """First-hitting sampler (Zheng et al., 2024): one uniformly chosen masked position per
    network call, at the exact time it is revealed; L calls for L masks."""
    chain, proposal = _common(temperature, top_k, top_p, gumbel_dtype, suppress_eos)
    rule = Unmask(select=select.FixedCount(1), score=scores.Random(), proposal=proposal,
                  transforms=chain, time=times.FirstHitting())
    return Sampler("first_hitting", rule, Stop(stop_at_eos, eos_fill))


def llada(steps: int | None = None, block_length: int | None = 32,
          remasking: str = "low_confidence", temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, gumbel_dtype: str | None = None, stop_at_eos: bool = False,
          eos_fill: str = "eos", suppress_eos: bool = False) -> Sampler:
    """LLaDA: semi-autoregressive blocks of `block_length` (None: one block), `steps` (None:
    one per position) shared evenly between them; each step commits a fixed share of the
    block's masks, the most confident ('low_confidence' remasking) or random ones."""
    _check_positive("steps", steps)
    _check_positive("block_length", block_length)
    choices = {"low_confidence": scores.Probability(), "random": scores.Random()}
    if remasking not in choices:
        raise ValueError(f"remasking={remasking!r}; allowed: {', '.join(choices)}")
    chain, proposal = _common(temperature, top_k, top_p, gumbel_dtype, suppress_eos)
    rule = Unmask(select=select.ScheduledCount("linear"), score=choices[remasking],
                  proposal=proposal, transforms=chain, steps=steps, block_length=block_length)
    return Sampler("llada", rule, Stop(stop_at_eos, eos_fill))


def dream(steps: int | None = None, alg: str = "entropy", temperature: float = 0.2,
          top_k: int = 0, top_p: float = 0.95, block_length: int | None = None,
          gumbel_dtype: str | None = None, stop_at_eos: bool = False, eos_fill: str = "eos",
          suppress_eos: bool = False) -> Sampler:
    """Dream: each of `steps` steps commits masked positions / steps left, ordered by
    `alg`: 'entropy' (lowest entropy first), 'margin' (top-1 minus top-2 probability),
    'confidence' or 'random'."""
    _check_positive("steps", steps)
    _check_positive("block_length", block_length)
    chain, proposal = _common(temperature, top_k, top_p, gumbel_dtype, suppress_eos)
    rule = Unmask(select=select.ScheduledCount("linear"), score=scores.by_name(alg),
                  proposal=proposal, transforms=chain, steps=steps, block_length=block_length)
    return Sampler("dream", rule, Stop(stop_at_eos, eos_fill))


def fast_dllm(threshold: float = 0.9, factor: float | None = None,
              block_length: int | None = None, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, gumbel_dtype: str | None = None, stop_at_eos: bool = False,
              eos_fill: str = "eos", suppress_eos: bool = False) -> Sampler:
    """Fast-dLLM parallel decoding: commit every masked position whose confidence exceeds
    `threshold` (and always the most confident one), or with `factor` the factor rule;
    optionally within semi-autoregressive blocks."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in (0, 1]")
    if factor is not None and factor <= 0:
        raise ValueError(f"factor={factor} must be > 0 (or None for the threshold rule)")
    _check_positive("block_length", block_length)
    chain, proposal = _common(temperature, top_k, top_p, gumbel_dtype, suppress_eos)
    rule_select = select.Threshold(threshold) if factor is None else select.Factor(factor)
    rule = Unmask(select=rule_select, score=scores.Probability(), proposal=proposal,
                  transforms=chain, block_length=block_length)
    return Sampler("fast_dllm", rule, Stop(stop_at_eos, eos_fill))


def ar(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
       gumbel_dtype: str | None = None, stop_at_eos: bool = False, eos_fill: str = "eos",
       suppress_eos: bool = False) -> Sampler:
    """Autoregressive decoding with the KV cache: ancestral at temperature 1, greedy at 0."""
    chain, proposal = _common(temperature, top_k, top_p, gumbel_dtype, suppress_eos)
    return Sampler("ar", NextToken(proposal=proposal, transforms=chain),
                   Stop(stop_at_eos, eos_fill))


def edlm(num_candidates: int = 4, window_low: float = 0.0, window_high: float = 1.0,
         energy_temperature: float = 1.0, steps: int | None = None, eps: float = 1e-5,
         noise_removal: bool = True, temperature: float = 1.0, top_k: int = 0,
         top_p: float = 1.0, gumbel_dtype: str | None = None, stop_at_eos: bool = False,
         eos_fill: str = "eos", suppress_eos: bool = False) -> Sampler:
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
    base = mdlm(steps=steps, eps=eps, noise_removal=noise_removal, temperature=temperature,
                top_k=top_k, top_p=top_p, gumbel_dtype=gumbel_dtype, stop_at_eos=stop_at_eos,
                eos_fill=eos_fill, suppress_eos=suppress_eos)
    rule = ImportanceUnmask(base.rule, num_candidates=num_candidates,
                            window=(float(window_low), float(window_high)),
                            energy_temperature=float(energy_temperature),
                            gumbel_dtype=gumbel_dtype)
    return Sampler("edlm", rule, base.stop)


BLOCK_POLICIES = ("first_hitting", "mdlm", "fixed_count", "threshold")


def bd3lm(block_size: int | None = None, policy: str = "first_hitting",
          steps: int | None = None, threshold: float = 0.9, kv_cache: bool = True,
          window: int | None = None, temperature: float = 1.0, top_k: int = 0,
          top_p: float = 1.0, gumbel_dtype: str | None = None, stop_at_eos: bool = False,
          eos_fill: str = "eos", suppress_eos: bool = False) -> Sampler:
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
    Nucleus / top-k / temperature apply inside blocks as everywhere."""
    _check_positive("block_size", block_size)
    _check_positive("steps", steps)
    _check_positive("window", window)
    if policy not in BLOCK_POLICIES:
        raise ValueError(f"policy={policy!r}; allowed: {', '.join(BLOCK_POLICIES)}")
    if steps is not None and policy in ("first_hitting", "threshold"):
        raise ValueError(f"policy {policy!r} takes no steps (it commits by its own rule); use "
                         "policy='mdlm' or 'fixed_count' for a step count")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in (0, 1]")
    chain, proposal = _common(temperature, top_k, top_p, gumbel_dtype, suppress_eos)
    if policy == "first_hitting":
        inner = Unmask(select=select.FixedCount(1), score=scores.Random(), proposal=proposal,
                       transforms=chain, time=times.FirstHitting())
    elif policy == "mdlm":
        inner = Unmask(select=select.Reveal(), proposal=proposal, transforms=chain,
                       steps=steps, time=times.GridTime(), final_greedy=True)
    elif policy == "fixed_count":
        inner = Unmask(select=select.ScheduledCount("linear"), score=scores.Probability(),
                       proposal=proposal, transforms=chain, steps=steps)
    else:
        inner = Unmask(select=select.Threshold(threshold), score=scores.Probability(),
                       proposal=proposal, transforms=chain)
    rule = BlockUnmask(inner, block_size=block_size, kv_cache=bool(kv_cache), window=window)
    return Sampler("bd3lm", rule, Stop(stop_at_eos, eos_fill))


SAMPLERS = {
    "mdlm": mdlm,
    "ddpm_cache": functools.partial(mdlm, cache_logits=True),
    "first_hitting": first_hitting,
    "llada": llada,
    "dream": dream,
    "fast_dllm": fast_dllm,
    "ar": ar,
    "bd3lm": bd3lm,
    "edlm": edlm,
}
# The recipes that need a causal network, and those that need a block diffusion network
# (a BlockDenoiser); the others need a masked denoiser.
AUTOREGRESSIVE = ("ar",)
BLOCK = ("bd3lm",)
# The recipes that need a denoiser with an energy (an EnergyDenoiser).
ENERGY = ("edlm",)


def options(name: str) -> dict:
    """{option: default} of the recipe called `name`."""
    return {p.name: p.default for p in inspect.signature(_recipe(name)).parameters.values()}


def get_sampler(name: str, **overrides) -> Sampler:
    """The recipe called `name` with `overrides` of its options.

    Raises ValueError for an unknown name or option (listing the known ones) or a bad value.
    """
    recipe = _recipe(name)
    allowed = options(name)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(allowed)}")
    return dataclasses.replace(recipe(**overrides), name=name)


def _recipe(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
