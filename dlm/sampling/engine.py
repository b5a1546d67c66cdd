"""The one sampler loop: a jit-compiled `lax.while_loop` over `SamplerState`, and `draw`.

A `Sampler` is a frozen (hashable) pair of a step rule and a stop policy. The loop (`run`)
runs the rule until every sample is done or the rule's step budget is spent; samples that
finish early are frozen while the others go on. The sampler and the network are static
arguments, so there is one compilation per (batch, length, sampler, network) and the loop
body is traced once. `draw` is the one public way to sample: it compiles `run` ahead of time
for the inputs' shapes and runs it over batches. A new sampler is a new `StepRule` (or new
policies for an existing one, see `unmask`) and a recipe naming it (see `recipes`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dlm.sampling import stop as stop_lib
from dlm.sampling.networks import KIND_NAMES
from dlm.sampling.state import SampleOutput, SamplerState


class StepRule(Protocol):
    """What the loop asks of a sampler's step; implementations are frozen dataclasses.

    A rule may also define `for_network(network) -> rule`, which the loop calls first to
    settle options that default to the network's (the bd3lm block size).
    """

    # The kind of network it samples (one of `networks.NETWORK_KINDS`); `check_network`.
    network_kind: ClassVar[str]
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


def keep_done(before: SamplerState, after: SamplerState) -> SamplerState:
    """Rows that were done before the step keep their tokens and statistics."""
    done_B = before.done_B
    done_BL = done_B[:, None]
    return after.replace(
        tokens_BL=jnp.where(done_BL, before.tokens_BL, after.tokens_BL),
        confidence_BL=jnp.where(done_BL, before.confidence_BL, after.confidence_BL),
        commit_step_BL=jnp.where(done_BL, before.commit_step_BL, after.commit_step_BL),
        t_B=jnp.where(done_B, before.t_B, after.t_B),
        nfe_B=before.nfe_B + jnp.where(done_B, 0, after.nfe - before.nfe),
        token_forwards_B=jnp.where(done_B, before.token_forwards_B, after.token_forwards_B),
        remasked_B=jnp.where(done_B, before.remasked_B, after.remasked_B),
    )


@functools.partial(jax.jit, static_argnames=("sampler", "network", "prefix_len"))
def run(sampler: Sampler, network, params, tokens_BL: jax.Array, known_BL: jax.Array,
        rng: jax.Array, prefix_len: int = 0) -> SampleOutput:
    """Samples every open position of tokens_BL [B, L] (known_BL [B, L] bool stays fixed).

    `prefix_len` is the length of a prompt that every row shares (only rules with
    `uses_prefix` read it; pass 0 otherwise). Returns a SampleOutput with [B, L] arrays.
    The loop itself: sample with `draw`. Raises ValueError (when traced) for a network the
    sampler does not take (`check_network`).
    """
    check_network(sampler, network.kind)
    vocab = network.vocab
    rule = sampler.rule
    if hasattr(rule, "for_network"):  # options defaulting to the network's (bd3lm's block size)
        rule = rule.for_network(network)
    length = tokens_BL.shape[1]
    state = SamplerState.start(tokens_BL, known_BL, rng, vocab.mask_id)
    state = sampler.stop.update(rule.init(network, params, state, prefix_len), vocab)
    max_steps = rule.max_steps(length, prefix_len)

    def cond_fn(state: SamplerState) -> jax.Array:
        return (state.step < max_steps) & ~jnp.all(state.done_B)

    def body_fn(state: SamplerState) -> SamplerState:
        key = jax.random.fold_in(state.rng, state.step)
        after = keep_done(state, rule.step(network, params, state, key))
        after = sampler.stop.update(after, vocab)
        return after.replace(step=state.step + 1)

    return SampleOutput.from_state(lax.while_loop(cond_fn, body_fn, state))


@dataclasses.dataclass(frozen=True)
class Drawn:
    """What `draw` returns.

    Attributes:
      output: the samples on the host (numpy), batches concatenated: tokens_BL, known_BL,
        confidence_BL, commit_step_BL [num_batches * B, L], nfe_B, token_forwards_B,
        remasked_B and done_B [num_batches * B]; nfe (network calls) and steps (loop
        iterations) summed over the batches.
      seconds: wall time of each batch's call, compilation excluded.
      compile_seconds: the time to compile the loop for these shapes (near 0 when JAX had
        already compiled it).
      known_BL: bool [B, L], the conditioning positions of one batch (prompt or infilling
        context), on the host.
      prompt_len: the length of the prefix known in every row (the prompt's, or the leading
        run of columns known in every row when infilling).
    """

    output: SampleOutput
    seconds: tuple[float, ...]
    compile_seconds: float
    known_BL: np.ndarray
    prompt_len: int


def draw(sampler: Sampler, network, params, rng: jax.Array, *, batch_size: int | None = None,
         length: int | None = None, prompt=None, tokens_BL=None, known_BL=None,
         num_batches: int = 1, sharding: jax.sharding.Sharding | None = None,
         fetch: Callable[[Any], Any] = jax.device_get) -> Drawn:
    """Samples `num_batches` batches of `batch_size` sequences; the one way to draw samples.

    The inputs are either `prompt` ([P] shared by all rows or [B, P] per row; None: no
    prompt) continued to `length` tokens, or, for infilling, `tokens_BL` int32 [B, L] filled
    wherever `known_BL` bool [B, L] is False (`batch_size` and `length`, if given, must match
    their shape). Rules that need a shared prompt (AR) take the leading run of columns known
    in every row as it.

    `run` is compiled once for these shapes, timed apart; batch i then draws with key
    `jax.random.fold_in(rng, i)`. The inputs are placed with `sharding` (None: the default
    device) and each batch's output is brought to the host with `fetch` once it is ready
    (for multi-process runs, a fetch that gathers rows split over processes).

    Raises ValueError for inconsistent inputs, a prompt longer than `length` or holding the
    mask id, an AR sampler without a first token, or a sampler that does not take the
    network (`check_network`).
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1")
    tokens_BL, known_BL, prompt_len = _inputs(network.vocab.mask_id, batch_size, length, prompt,
                                              tokens_BL, known_BL)
    prefix_len = static_prefix(sampler, prompt_len)
    known_host_BL = known_BL
    if sharding is None:
        tokens_BL, known_BL = jnp.asarray(tokens_BL), jnp.asarray(known_BL)
    else:
        tokens_BL, known_BL = (jax.device_put(x, sharding) for x in (tokens_BL, known_BL))
    start = time.perf_counter()  # compiled ahead of time, so that compilation is timed apart
    sample_fn = run.lower(sampler, network, params, tokens_BL, known_BL, rng,
                          prefix_len=prefix_len).compile()  # (params, tokens, known, rng)
    compile_seconds = time.perf_counter() - start

    outputs, seconds = [], []
    for index in range(num_batches):
        start = time.perf_counter()
        out = jax.block_until_ready(sample_fn(params, tokens_BL, known_BL,
                                              jax.random.fold_in(rng, index)))
        seconds.append(time.perf_counter() - start)
        outputs.append(fetch(out))
    return Drawn(output=_concatenate(outputs), seconds=tuple(seconds),
                 compile_seconds=compile_seconds, known_BL=known_host_BL,
                 prompt_len=prompt_len)


def _inputs(mask_id: int, batch_size, length, prompt, tokens_BL, known_BL
            ) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens_BL int32, known_BL bool, shared prefix length) on the host, from `draw`'s
    prompt or infilling arguments."""
    if tokens_BL is None and known_BL is None:
        if batch_size is None or length is None:
            raise ValueError("draw needs batch_size and length (or tokens_BL and known_BL)")
        return prefix_inputs(prompt, batch_size, length, mask_id)
    if tokens_BL is None or known_BL is None:
        raise ValueError("infilling needs both tokens_BL and known_BL")
    if prompt is not None:
        raise ValueError("pass a prompt or tokens_BL / known_BL, not both")
    tokens_BL = np.asarray(tokens_BL, np.int32)
    known_BL = np.asarray(known_BL, bool)
    if tokens_BL.ndim != 2 or known_BL.shape != tokens_BL.shape:
        raise ValueError(f"tokens_BL {tokens_BL.shape} and known_BL {known_BL.shape} must be "
                         "[B, L] of one shape")
    for name, value, size in (("batch_size", batch_size, tokens_BL.shape[0]),
                              ("length", length, tokens_BL.shape[1])):
        if value is not None and value != size:
            raise ValueError(f"{name}={value}, but tokens_BL has shape {tokens_BL.shape}")
    shared_prefix = int(np.argmin(np.append(known_BL.all(axis=0), False)))
    return tokens_BL, known_BL, shared_prefix


def _concatenate(outputs: list[SampleOutput]) -> SampleOutput:
    """The batches' host outputs as one: rows concatenated, nfe and steps summed."""
    def join(*leaves):
        leaves = [np.asarray(leaf) for leaf in leaves]
        if leaves[0].ndim == 0:
            return np.sum(leaves, axis=0, dtype=leaves[0].dtype)
        return np.concatenate(leaves)

    return jax.tree.map(join, *outputs)


def check_network(sampler: Sampler, kind: str, what: str = "network") -> None:
    """Raises ValueError unless `sampler` samples networks of `kind` (a network's `kind`, or
    a process's `network_kind`); the message names `what` and the samplers that fit it."""
    needs = sampler.rule.network_kind
    if needs == kind:
        return
    from dlm.sampling import recipes  # the recipes sit above the engine

    fitting = recipes.samplers_for(kind)
    use = f"use {', '.join(fitting)}" if fitting else "no sampler takes it"
    raise ValueError(f"sampler {sampler.name!r} cannot sample {_a(KIND_NAMES.get(kind, kind))} "
                     f"{what}: it needs {_a(needs)} network, this is {_a(kind)} one; {use}")


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


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
