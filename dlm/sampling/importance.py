"""EDLM's parallel importance sampling (`ImportanceUnmask`): a masked-diffusion step towards a
resampled x_0, and the sequence-level energies it resamples under.

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

Two energies share one interface (`Energy`), both frozen dataclasses over hashable apply
functions (build them from Flax modules with `energy_from_flax`):

- `ARResidualEnergy` (EDLM-AR): E = -log p_AR(x_0) + log p_theta(x_0 | x_t), both summed over
  the positions masked in x_t (the others are carried over from x_t and are the same for
  every candidate). Then p_theta exp(-E) is p_AR on those positions: no training, and Z = 1
  up to the first position, which the AR model does not score (it keeps p_theta's).
- `LearnedEnergy` (EDLM-NCE): a trained `dlm.models.energy_net.EnergyNet` (trained by
  `dlm.diffusion.energy.EnergyNCE`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from dlm.diffusion.autoregressive import Autoregressive
from dlm.sampling import categorical, transforms
from dlm.sampling.state import SamplerState
from dlm.sampling.unmask import Unmask


class Energy(Protocol):
    """E(x_0, x_t, t): float32 [B], low for likely candidates. Hashable (samplers are jitted
    with it static)."""

    def __call__(self, params: Any, x0_BL: jax.Array, xt_BL: jax.Array, t_B: jax.Array,
                 log_p_BL: jax.Array, mask_id: int) -> jax.Array:
        """The energy of candidates x0_BL (int32 [B, L], equal to xt_BL where it is not
        `mask_id`) given xt_BL at times t_B; log_p_BL float32 [B, L] is the denoiser's
        log p_theta(x_0^i | x_t) of each candidate token (0 where x_t is not masked)."""
        ...


@dataclasses.dataclass(frozen=True)
class ARResidualEnergy:
    """EDLM-AR: E = -log p_AR(x_0) + log p_theta(x_0 | x_t) over the masked positions of x_t
    that the causal LM scores (all but the first).

    Attributes:
      logits_fn: hashable `(params, tokens_BL) -> logits_BLV`, the causal LM's logits over
        the whole sequence (row i predicts token i + 1).
    """

    logits_fn: Callable[[Any, jax.Array], jax.Array]

    def __call__(self, params, x0_BL, xt_BL, t_B, log_p_BL, mask_id):
        del t_B
        scored_BL = (xt_BL == mask_id).at[:, 0].set(False)

        def ar_fn(tokens_BL, t_B=None):
            del t_B
            return self.logits_fn(params, tokens_BL)

        batch = {"tokens": x0_BL, "loss_mask": jnp.ones(x0_BL.shape, jnp.float32)}
        nll_BL, _ = Autoregressive(mask_id=mask_id).token_losses(ar_fn, batch)  # [B, L-1]
        log_p_ar_B = -jnp.sum(jnp.where(scored_BL[:, 1:], nll_BL, 0.0), axis=-1)
        log_p_theta_B = jnp.sum(jnp.where(scored_BL, log_p_BL, 0.0), axis=-1)
        return log_p_theta_B - log_p_ar_B


@dataclasses.dataclass(frozen=True)
class LearnedEnergy:
    """EDLM-NCE: a trained energy network.

    Attributes:
      energy_fn: hashable `(params, x0_BL, xt_BL, t_B) -> E_B` float32 [B].
    """

    energy_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]

    def __call__(self, params, x0_BL, xt_BL, t_B, log_p_BL, mask_id):
        del log_p_BL, mask_id
        return self.energy_fn(params, x0_BL, xt_BL, t_B)


@dataclasses.dataclass(frozen=True)
class _FlaxCausalLogits:
    module: Any  # flax.linen.Module (hashable by value), a causal Transformer

    def __call__(self, params, tokens_BL):
        return self.module.apply({"params": params}, tokens_BL, None, train=False)


@dataclasses.dataclass(frozen=True)
class _FlaxEnergy:
    module: Any  # an EnergyNet

    def __call__(self, params, x0_BL, xt_BL, t_B):
        return self.module.apply({"params": params}, x0_BL, t_B, train=False, xt_BL=xt_BL)


def energy_from_flax(module, kind: str) -> ARResidualEnergy | LearnedEnergy:
    """The energy of a trained Flax module, by its process's `network_kind`: 'causal' (an AR
    Transformer: EDLM-AR) or 'energy' (an EnergyNet from EDLM-NCE). Hashable by value.
    Raises ValueError for another kind."""
    if kind == "causal":
        return ARResidualEnergy(_FlaxCausalLogits(module))
    if kind == "energy":
        return LearnedEnergy(_FlaxEnergy(module))
    raise ValueError(f"an energy comes from a 'causal' network (EDLM-AR) or an 'energy' "
                     f"network (EDLM-NCE), not a {kind!r} one")


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

    network_kind: ClassVar[str] = "denoiser+energy"
    uses_prefix: ClassVar[bool] = False

    def max_steps(self, length: int, prefix_len: int = 0) -> int:
        return self.inner.max_steps(length, prefix_len)

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
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
        # The energy scores k candidates of L positions.
        return after.called(self.num_candidates * state.tokens_BL.shape[1], resampling)

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
