"""Stop policy: a sample is done when no position is open; optionally it ends at its EOS.

The step budget (the other way to stop) is the loop's `max_steps`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dlm.sampling.networks import Vocab
from dlm.sampling.state import SamplerState

FILLS = ("eos", "pad")


@dataclasses.dataclass(frozen=True)
class Stop:
    """With `at_eos`, every generated position after a sample's first generated EOS is
    overwritten with EOS or pad (`fill`), so the sample ends there and stops as soon as the
    positions before it are filled. Known positions are never touched and an EOS among them
    does not count."""

    at_eos: bool = False
    fill: str = "eos"

    def __post_init__(self):
        if self.fill not in FILLS:
            raise ValueError(f"eos fill {self.fill!r}; allowed: {', '.join(FILLS)}")

    def update(self, state: SamplerState, vocab: Vocab) -> SamplerState:
        """The state with the EOS fill applied and `done_B` recomputed."""
        if self.at_eos:
            state = self._fill_after_eos(state, vocab)
        return state.replace(done_B=~jnp.any(state.open_BL(vocab.mask_id), axis=-1))

    def _fill_after_eos(self, state: SamplerState, vocab: Vocab) -> SamplerState:
        if vocab.eos_id is None:
            raise ValueError("stop_at_eos needs the network's vocab to have an eos_id")
        fill_id = vocab.eos_id if self.fill == "eos" else vocab.pad_id
        if fill_id is None:
            raise ValueError("eos fill 'pad' needs the network's vocab to have a pad_id")
        length = state.tokens_BL.shape[1]
        pos_L = jnp.arange(length)
        generated_eos_BL = (state.tokens_BL == vocab.eos_id) & ~state.known_BL
        first_eos_B = jnp.min(jnp.where(generated_eos_BL, pos_L, length), axis=-1)
        after_BL = (pos_L > first_eos_B[:, None]) & ~state.known_BL
        changed_BL = after_BL & (state.tokens_BL != fill_id)
        return state.replace(
            tokens_BL=jnp.where(after_BL, fill_id, state.tokens_BL),
            commit_step_BL=jnp.where(changed_BL, state.step, state.commit_step_BL),
            confidence_BL=jnp.where(changed_BL, jnp.nan, state.confidence_BL),
        )
