"""Energy-based diffusion (EDLM, Xu et al., 2024): a sequence-level energy corrects the
factorised denoiser of a masked diffusion model.

    p(x_0 | x_t) = p_theta(x_0 | x_t) exp(-E(x_0, x_t, t)) / Z(x_t, t)

Low energy means more likely. The energies the sampler uses (EDLM-AR's residual of an AR
run, EDLM-NCE's trained `dlm.models.energy_net.EnergyNet`) and the importance sampler are in
`dlm.sampling.importance`.

`EnergyNCE` is the process that trains the learned energy by noise-contrastive estimation:
x_0 from the data is the positive, x_hat_0 ~ p_theta(. | x_t) from the frozen MDLM denoiser
the negative, and the classifier with logit -E gives

    loss = softplus(E(x_0, x_t)) + softplus(-E(x_hat_0, x_t))   per example,

which is 2 log 2 = log 4 while the energy cannot tell them apart. The frozen denoiser (one of
`frozen_networks`, bound by the caller as `frozen["denoiser"]`) is the process state
(`{"denoiser": params}`), copied from `config.init_from` at the start.

Its `nll` is the paper's estimate: MDLM's continuous-time NELBO with the factorised term of
the masked positions replaced by the joint one,

    w(t) * [ -sum_masked log p_theta(x_0^i | x_t) + E(x_0, x_t) + log Z(x_t) ],

log Z estimated by log mean_k exp(-E(x_hat_k, x_t)) over `nll_negatives` draws from
p_theta. By Jensen this under-estimates log Z on average, so the figure is an estimate, not
a bound (with one draw it is the paper's -E(x_hat_0)).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dlm.diffusion import masked, process


def sample_denoiser(log_probs_BLV: jax.Array, rng: jax.Array,
                    example_id_B: jax.Array) -> jax.Array:
    """int32 [B, L]: one full-sequence draw from the factorised log_probs_BLV (float32 SUBS
    log-probabilities, so unmasked positions keep their token), keyed per example."""
    keys_B = process.example_keys(rng, example_id_B)
    return jax.vmap(lambda key, lp: jax.random.categorical(key, lp, axis=-1))(
        keys_B, log_probs_BLV.astype(jnp.float32)).astype(jnp.int32)


@process.PROCESSES.register("edlm_nce")
@dataclasses.dataclass(frozen=True)
class EnergyNCE(process.Process):
    """EDLM-NCE training of an energy network against a frozen MDLM denoiser (the process
    state and `frozen["denoiser"]`). The network trained is an EnergyNet: model_fn(x0, t,
    xt_BL=x_t) -> E [B].

    Attributes:
      diffusion: the masked diffusion the denoiser was trained with (schedule, t_min, ...).
      nll_negatives: draws from p_theta used to estimate log Z in `nll`.
    """

    diffusion: masked.MaskedDiffusion
    nll_negatives: int = 1

    models: ClassVar[tuple[str, ...]] = ("energy",)
    network_kind: ClassVar[str] = "energy"

    @classmethod
    def from_config(cls, config, vocab_size: int) -> EnergyNCE:
        """The EDLM-NCE process of `config`; ValueError naming the key."""
        negatives = config.process.get("nll_negatives", 1)
        if not isinstance(negatives, int) or negatives < 1:
            raise ValueError(f"process.nll_negatives={negatives!r} must be a positive int")
        if not config.get("init_from", ""):
            raise ValueError("process.name='edlm_nce' trains against a frozen MDLM denoiser: "
                             "set config.init_from to the MDLM run's workdir")
        return EnergyNCE(diffusion=masked.MaskedDiffusion.from_config(config, vocab_size),
                         nll_negatives=negatives)

    @property
    def mask_id(self) -> int:
        return self.diffusion.mask_id

    @property
    def schedule(self):
        return self.diffusion.schedule

    def frozen_networks(self) -> dict[str, str | None]:
        """The MDLM denoiser: a DiT of this config's model size, the init_from run's."""
        return {"denoiser": "dit"}

    def init_state(self, frozen_params) -> dict:
        """{"denoiser": params}: the init_from run's weights."""
        return {"denoiser": frozen_params["denoiser"]}

    def _denoise(self, frozen, xt_BL, t_B) -> jax.Array:
        """float32 SUBS log p_theta(x_0 | x_t) [B, L, V] of the frozen denoiser."""
        return self.diffusion.subs_log_probs(frozen["denoiser"](xt_BL, t_B), xt_BL)

    def _pair(self, model_fn, batch, rng, num_examples, frozen):
        """(t_B, x_t, log p_theta, E(x_0), E(negative)) for one draw of t, x_t and x_hat_0."""
        noise_rng, negative_rng = jax.random.split(rng)
        t_B, xt_BL = self.diffusion.noised(batch, noise_rng, num_examples)
        log_probs_BLV = self._denoise(frozen, xt_BL, t_B)
        negative_BL = sample_denoiser(log_probs_BLV, negative_rng, batch["example_id"])
        positive_B = model_fn(batch["tokens"], t_B, xt_BL=xt_BL)
        negative_B = model_fn(negative_BL, t_B, xt_BL=xt_BL)
        return t_B, xt_BL, log_probs_BLV, positive_B, negative_B

    def loss(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *,
             num_examples: int, state=None, frozen=None) -> tuple[jax.Array, process.Metrics]:
        """NCE: softplus(E+) + softplus(-E-) per example; the mean is over examples with at
        least one real token."""
        del state
        _, _, _, positive_B, negative_B = self._pair(model_fn, batch, rng, num_examples, frozen)
        real_B = jnp.any(batch["loss_mask"] > 0, axis=-1).astype(jnp.float32)
        loss_B = jax.nn.softplus(positive_B) + jax.nn.softplus(-negative_B)
        loss_sum = jnp.sum(loss_B * real_B)
        count = jnp.sum(real_B)
        return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "token_count": count}

    def nll(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *,
            num_examples: int, state=None, frozen=None) -> tuple[jax.Array, jax.Array]:
        """The EDLM NLL estimate per sequence (see the module docstring), float32 [B]."""
        del state
        pair_rng, extra_rng = jax.random.split(rng)
        t_B, xt_BL, log_probs_BLV, positive_B, negative_B = self._pair(
            model_fn, batch, pair_rng, num_examples, frozen)
        tokens_BL = batch["tokens"]
        real_BL = batch["loss_mask"] > 0
        log_p_BL = jnp.take_along_axis(log_probs_BLV, tokens_BL[..., None], axis=-1)[..., 0]
        weight_B = self.diffusion.time_weight(t_B)
        factorised_B = jnp.sum(jnp.where(real_BL, -weight_B[:, None] * log_p_BL, 0.0), axis=-1)

        def more_negatives(k):
            draw = sample_denoiser(log_probs_BLV, jax.random.fold_in(extra_rng, k),
                                   batch["example_id"])
            return model_fn(draw, t_B, xt_BL=xt_BL)

        negatives_KB = negative_B[None]
        if self.nll_negatives > 1:
            negatives_KB = jnp.concatenate(
                [negatives_KB, jax.lax.map(more_negatives, jnp.arange(self.nll_negatives - 1))])
        log_z_B = (jax.nn.logsumexp(-negatives_KB, axis=0)
                   - jnp.log(jnp.float32(self.nll_negatives)))
        correction_B = weight_B * (positive_B + log_z_B)
        count_B = jnp.sum(real_BL.astype(jnp.float32), axis=-1)
        return jnp.where(count_B > 0, factorised_B + correction_B, 0.0), count_B
