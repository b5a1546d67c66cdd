"""The one sampler loop: a jit-compiled `lax.while_loop` over `SamplerState`.

A `Sampler` is a frozen (hashable) pair of a step rule and a stop policy. The loop runs the
rule until every sample is done or the rule's step budget is spent; samples that finish early
are frozen while the others go on. The sampler and the network are static arguments, so there
is one compilation per (batch, length, sampler, network) and the loop body is traced once.
A new sampler is a new `StepRule` (or new policies for an existing one, see `unmask`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dlm.sampling import stop as stop_lib
from dlm.sampling.state import SampleOutput, SamplerState, initial_state


class StepRule(Protocol):
    """What the loop asks of a sampler's step; implementations are frozen dataclasses.

    A rule may also define `for_network(network) -> rule`, which the loop calls first to check
    the network and settle options that default to the network's (the bd3lm block size).
    """

    # Whether `init` needs the length of a prompt shared by all rows (AR prefill); rules
    # that do not get 0, so prompts of any length share one compilation.
    uses_prefix: ClassVar[bool]

    def max_steps(self, length: int, prefix_len: int) -> int:
        """The loop's step budget (a Python int)."""

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        """The state before the first step: caches built, prompt prefilled (counted in nfe)."""

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        """One step: network calls (added to `nfe`) and commits (`SamplerState.committed`)."""


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A named step rule and stop policy; build one with `recipes.get_sampler`."""

    name: str
    rule: StepRule
    stop: stop_lib.Stop = stop_lib.Stop()


def _keep_done(before: SamplerState, after: SamplerState) -> SamplerState:
    """Rows that were done before the step keep their tokens and statistics."""
    done_B = before.done_B
    done_BL = done_B[:, None]
    return after.replace(
        tokens_BL=jnp.where(done_BL, before.tokens_BL, after.tokens_BL),
        confidence_BL=jnp.where(done_BL, before.confidence_BL, after.confidence_BL),
        commit_step_BL=jnp.where(done_BL, before.commit_step_BL, after.commit_step_BL),
        t_B=jnp.where(done_B, before.t_B, after.t_B),
        nfe_B=before.nfe_B + jnp.where(done_B, 0, after.nfe - before.nfe),
    )


@functools.partial(jax.jit, static_argnames=("sampler", "network", "prefix_len"))
def run(sampler: Sampler, network, params, tokens_BL: jax.Array, known_BL: jax.Array,
        rng: jax.Array, prefix_len: int = 0) -> SampleOutput:
    """Samples every open position of tokens_BL [B, L] (known_BL [B, L] bool stays fixed).

    `prefix_len` is the length of a prompt that every row shares (only rules with
    `uses_prefix` read it; pass 0 otherwise). Returns a SampleOutput with [B, L] arrays.
    """
    vocab = network.vocab
    rule = sampler.rule
    if hasattr(rule, "for_network"):  # options defaulting to the network's (bd3lm's block size)
        rule = rule.for_network(network)
    length = tokens_BL.shape[1]
    state = initial_state(tokens_BL, known_BL, rng, vocab.mask_id)
    state = sampler.stop.update(rule.init(network, params, state, prefix_len), vocab)
    max_steps = rule.max_steps(length, prefix_len)

    def cond_fn(state: SamplerState) -> jax.Array:
        return (state.step < max_steps) & ~jnp.all(state.done_B)

    def body_fn(state: SamplerState) -> SamplerState:
        key = jax.random.fold_in(state.rng, state.step)
        after = _keep_done(state, rule.step(network, params, state, key))
        after = sampler.stop.update(after, vocab)
        return after.replace(step=state.step + 1)

    return SampleOutput.from_state(lax.while_loop(cond_fn, body_fn, state))


def compile_run(sampler: Sampler, network, params, tokens_BL, known_BL, rng,
                prefix_len: int = 0):
    """`run` compiled ahead of time for these shapes: returns `fn(params, tokens_BL,
    known_BL, rng) -> SampleOutput` (so that compilation can be timed apart)."""
    return run.lower(sampler, network, params, tokens_BL, known_BL, rng,
                     prefix_len=prefix_len).compile()


def prefix_inputs(prompt, batch_size: int, length: int, mask_id: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens_BL int32, known_BL bool, P) for a prompt [P] (shared) or [B, P] (per row).

    Raises ValueError for a prompt longer than `length` or one holding the mask id.
    """
    prompt = np.zeros((0,), np.int32) if prompt is None else np.asarray(prompt, np.int32)
    if prompt.ndim == 1:
        prompt = np.broadcast_to(prompt, (batch_size, prompt.shape[0]))
    if prompt.ndim != 2 or prompt.shape[0] != batch_size:
        raise ValueError(f"prompt must be [P] or [batch_size={batch_size}, P], got shape "
                         f"{prompt.shape}")
    prompt_len = prompt.shape[1]
    if prompt_len > length:
        raise ValueError(f"the prompt has {prompt_len} tokens, more than length={length}")
    if np.any(prompt == mask_id):
        raise ValueError(f"the prompt holds the mask id {mask_id}")
    tokens_BL = np.full((batch_size, length), mask_id, np.int32)
    tokens_BL[:, :prompt_len] = prompt
    known_BL = np.zeros((batch_size, length), bool)
    known_BL[:, :prompt_len] = True
    return tokens_BL, known_BL, prompt_len


def generate(sampler: Sampler, network, params, rng: jax.Array, *, batch_size: int,
             length: int, prompt=None) -> SampleOutput:
    """Samples `batch_size` sequences of `length` tokens continuing `prompt` ([P] or [B, P]).

    Returns a SampleOutput whose tokens_BL [B, L] include the prompt.
    """
    tokens_BL, known_BL, prompt_len = prefix_inputs(prompt, batch_size, length,
                                                    network.vocab.mask_id)
    return run(sampler, network, params, jnp.asarray(tokens_BL), jnp.asarray(known_BL), rng,
               prefix_len=static_prefix(sampler, prompt_len))


def sampler_fn(sampler: Sampler, network, *, batch_size: int, length: int):
    """`sample(params, prompt, rng) -> SampleOutput` for fixed shapes (see `generate`)."""
    def sample(params, prompt, rng) -> SampleOutput:
        return generate(sampler, network, params, rng, batch_size=batch_size, length=length,
                        prompt=prompt)

    return sample


def static_prefix(sampler: Sampler, prompt_len: int) -> int:
    """The prefix length to compile for: the prompt's for rules that use it, else 0.

    Raises ValueError when such a rule (AR) gets no prompt: it needs a token to start from.
    """
    if not sampler.rule.uses_prefix:
        return 0
    if prompt_len < 1:
        raise ValueError(f"sampler {sampler.name!r} needs a prompt of at least one token "
                         "(e.g. BOS) to start from")
    return prompt_len


def infill(sampler: Sampler, network, params, rng: jax.Array, tokens_BL, known_BL
           ) -> SampleOutput:
    """Fills every position of tokens_BL [B, L] where known_BL [B, L] is False.

    Rules that need a shared prompt (AR) treat the leading run of columns known in every
    row as it.
    """
    known = np.asarray(known_BL, bool)
    shared_prefix = int(np.argmin(np.append(known.all(axis=0), False)))
    return run(sampler, network, params, jnp.asarray(tokens_BL, jnp.int32), jnp.asarray(known),
               rng, prefix_len=static_prefix(sampler, shared_prefix))
