"""EDLM's parallel importance sampling: a masked-diffusion step towards a resampled x_0.

At a step from t to s inside the time window, the denoiser proposes k full-sequence
candidates x_0^(1..k) ~ p_theta(. | x_t) in parallel (positions already unmasked are carried
over), the energy scores them, and one is drawn with probability proportional to
exp(-E / energy_temperature): self-normalised importance sampling from the residual model
p_theta(x_0 | x_t) exp(-E(x_0, x_t, t)). The ordinary reverse step then reveals positions
towards that candidate: the MDLM step, with the candidate in place of the per-position draw.
Outside the window (or with k = 1) it is exactly the plain step, with the same random draws;
MDLM's final argmax step (noise removal) never resamples.

The candidates come from the denoiser's distribution after the sampler's transforms
(temperature, top-k, top-p); the energy sees the untransformed log p_theta (as trained), so
with the default transforms the resampled x_0 targets the residual model exactly as k grows.
The energy call is counted in `nfe` (one per importance-sampling step).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from dlm.sampling import categorical, transforms
from dlm.sampling.networks import EnergyDenoiser
from dlm.sampling.state import SamplerState
from dlm.sampling.unmask import Unmask


@dataclasses.dataclass(frozen=True)
class ImportanceUnmask:
    """An `Unmask` rule whose proposal is importance-resampled under an energy (EDLM).

    Attributes:
      inner: the masked-diffusion rule (MDLM's ancestral steps in the `edlm` recipe).
      num_candidates: k, full-sequence candidates drawn per step in the window.
      window: (t_low, t_high): importance sampling at steps whose current t lies in it.
      energy_temperature: tau in exp(-E / tau).
      gumbel_dtype: noise of the resampling draw (None: float64 on cpu/gpu).
    """

    inner: Unmask
    num_candidates: int = 4
    window: tuple[float, float] = (0.0, 1.0)
    energy_temperature: float = 1.0
    gumbel_dtype: str | None = None

    uses_prefix: ClassVar[bool] = False

    def max_steps(self, length: int, prefix_len: int = 0) -> int:
        return self.inner.max_steps(length, prefix_len)

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        if not isinstance(network, EnergyDenoiser):
            raise ValueError("the edlm sampler needs a denoiser with an energy (an "
                             f"EnergyDenoiser: pass --energy_workdir), got a "
                             f"{type(network).__name__}")
        return self.inner.init(network.denoiser, params["denoiser"], state, prefix_len)

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        denoiser = network.denoiser
        logits_BLV, state = self.inner._logits(denoiser, params["denoiser"], state)
        if self.num_candidates == 1:
            return self.inner.update(denoiser, state, logits_BLV, key)
        low, high = self.window
        in_window_B = (state.t_B >= low) & (state.t_B <= high) & ~state.done_B
        if self.inner.final_greedy:  # the last step commits the argmax: nothing to resample
            last = self.inner.max_steps(state.tokens_BL.shape[1]) - 1
            in_window_B &= state.step != last
        resampling = jnp.any(in_window_B)

        def propose(log_probs_BLV, proposal_key):
            first_BL = self.inner.proposal(log_probs_BLV, proposal_key)

            def resample():
                chosen_BL = self._resample(network, params, state, logits_BLV, log_probs_BLV,
                                           first_BL, proposal_key)
                return jnp.where(in_window_B[:, None], chosen_BL, first_BL)

            return lax.cond(resampling, resample, lambda: first_BL)

        after = self.inner.update(denoiser, state, logits_BLV, key, propose=propose)
        return after.replace(nfe=after.nfe + resampling.astype(jnp.int32))

    def _resample(self, network, params, state: SamplerState, logits_BLV, log_probs_BLV,
                  first_BL, key) -> jax.Array:
        """int32 [B, L]: one of k candidates per row (the first is `first_BL`), drawn with
        probability proportional to exp(-E / tau)."""
        vocab = network.vocab
        k = self.num_candidates
        batch, length = first_BL.shape
        other_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(1, k))
        others_KBL = jax.vmap(lambda kk: self.inner.proposal(log_probs_BLV, kk))(other_keys)
        candidates_KBL = jnp.concatenate([first_BL[None], others_KBL])
        open_BL = state.open_BL(vocab.mask_id)
        x0_KBL = jnp.where(open_BL, candidates_KBL, state.tokens_BL)
        # The energy reads the denoiser's own log p_theta, before any sampling transform.
        base_BLV = transforms.log_probs(logits_BLV, (), vocab)
        log_p_KBL = jnp.where(open_BL, jax.vmap(
            lambda x0: jnp.take_along_axis(base_BLV, x0[..., None], axis=-1)[..., 0])(x0_KBL),
            0.0)
        flat = k * batch
        energy_KB = network.energy(
            params["energy"], x0_KBL.reshape(flat, length),
            jnp.broadcast_to(state.tokens_BL, (k, batch, length)).reshape(flat, length),
            jnp.broadcast_to(state.t_B, (k, batch)).reshape(flat),
            log_p_KBL.reshape(flat, length), vocab.mask_id).reshape(k, batch)
        log_w_BK = (-energy_KB.astype(jnp.float32) / self.energy_temperature).T
        log_w_BK = jnp.where(jnp.isnan(log_w_BK), -jnp.inf, log_w_BK)
        index_B = categorical.sample_categorical(jax.random.fold_in(key, k), log_w_BK,
                                                 categorical.resolve_dtype(self.gumbel_dtype))
        return jnp.take_along_axis(x0_KBL, index_B[None, :, None], axis=0)[0]
