"""Masked (absorbing-state) diffusion with the SUBS parameterisation: MDLM / MD4.

Forward process: each token is independently replaced by `mask_id` with probability
1 - alpha(t). Reverse model (SUBS): the network's logits with zero mass on the mask token,
and a point mass on the observed token wherever x_t is not masked (carry-over).

Loss, per real token (loss_mask = 1), zero at unmasked positions:
  continuous time (num_timesteps = 0), t ~ U[t_min, 1]:
      w(t) * -log p(x_0^i | x_t),   w(t) = -alpha'(t) / (1 - alpha(t))
  T steps (num_timesteps = T > 0), t uniform on {1/T, ..., 1}, s = t - 1/T:
      T * (alpha(s) - alpha(t)) / (1 - alpha(t)) * -log p(x_0^i | x_t)
Both are single-sample Monte-Carlo estimates of the NELBO's diffusion term; `nll` reports the
same estimator per sequence (the continuous bound when T = 0, the T-step bound when T > 0).

Following MDLM, two terms of the exact bound are left out. The reconstruction term for
t < t_min is O(t_min) nats per token (zero in the T-step bound, since alpha(0) = 1). The prior
term is zero when alpha(1) = eps = 0; for eps > 0 a token is clean at t = 1 with probability
eps, which the all-masked prior cannot explain, so the bound is exact only up to O(eps).

Padding positions are corrupted like any other and excluded from the loss by loss_mask.

Prompt/response data (supervised fine-tuning, `dlm.data.sft`): the prompt (`prompt_mask`) is
never masked, so it conditions every prediction, and scores nothing; the loss is the same
weighted NELBO over the response positions (and their fill: LLaDA's trained-on EOS tokens),
averaged over those tokens. Padding (`valid` = 0) is never attended.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dlm.diffusion import process, schedules


def mask_tokens(tokens_BL: jax.Array, mask_prob_BL: jax.Array, rng: jax.Array,
                example_id_B: jax.Array | None, mask_id: int) -> jax.Array:
    """int32 [B, L]: each token replaced by mask_id with its probability mask_prob_BL.

    Example b draws its L uniforms from fold_in(rng, example_id_B[b]) (default ids 0..B-1),
    so the draw does not depend on how the batch is split.
    """
    batch_size, length = tokens_BL.shape
    if example_id_B is None:
        example_id_B = jnp.arange(batch_size, dtype=jnp.int32)
    keys_B = process.example_keys(rng, example_id_B)
    u_BL = jax.vmap(lambda key: jax.random.uniform(key, (length,), jnp.float32))(keys_B)
    return jnp.where(u_BL < mask_prob_BL, mask_id, tokens_BL).astype(jnp.int32)


def subs_log_probs(logits_BLV: jax.Array, xt_BL: jax.Array, mask_id: int) -> jax.Array:
    """float32 log p(x_0 | x_t), [B, L, V], under the SUBS parameterisation.

    Masked positions: log-softmax of the logits with the mask token at -inf. Unmasked
    positions: 0 on the observed token, -inf elsewhere.
    """
    log_probs_BLV = jax.nn.log_softmax(process.exclude_token(logits_BLV, mask_id))
    vocab_V = jnp.arange(logits_BLV.shape[-1])
    carry_BLV = jnp.where(xt_BL[..., None] == vocab_V, 0.0, -jnp.inf)
    is_masked_BL1 = (xt_BL == mask_id)[..., None]
    return jnp.where(is_masked_BL1, log_probs_BLV, carry_BLV)


@process.PROCESSES.register("mdlm")
@dataclasses.dataclass(frozen=True)
class MaskedDiffusion(process.Process):
    """MDLM's masked diffusion process.

    Attributes:
      schedule: the noise schedule alpha(t).
      mask_id: the absorbing token (`process.mask_id`; default V - 1).
      t_min: smallest continuous training time (MDLM's sampling_eps).
      num_timesteps: T > 0 for the T-step discrete-time bound, 0 for continuous time.
    """

    schedule: schedules.Schedule
    mask_id: int
    t_min: float = 1e-3
    num_timesteps: int = 0

    # The DiT, or the transformer stack with a bidirectional mask (LLaDA, Dream).
    models: ClassVar[tuple[str, ...]] = ("dit", "transformer")
    network_kind: ClassVar[str] = "denoiser"
    exportable: ClassVar[bool] = True
    conditional: ClassVar[bool] = True

    @classmethod
    def check_config(cls, config) -> None:
        model = config.get("model", None)
        if model is not None and model.get("name") == "transformer" and \
                str(model.get("mask")) != "full":
            raise ValueError(f"process.name={config.process.name!r} on model.name "
                             f"'transformer' needs model.mask='full' (a denoiser sees every "
                             f"position), got {model.get('mask')!r}")

    @classmethod
    def from_config(cls, config, vocab_size: int) -> MaskedDiffusion:
        """MDLM of a run config: `process.schedule*`, `t_min`, `num_timesteps`, `mask_id`
        (default V - 1). Raises ValueError naming the offending key."""
        t_min = float(config.process.get("t_min", 1e-3))
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"process.t_min={t_min} must lie in (0, 1)")
        num_timesteps = config.process.get("num_timesteps", 0)
        if not isinstance(num_timesteps, int) or num_timesteps < 0:
            raise ValueError(f"process.num_timesteps={num_timesteps!r} must be an int >= 0 "
                             "(0: continuous time)")
        return MaskedDiffusion(schedule=schedules.make_schedule(config),
                               mask_id=process.mask_id_of(config, vocab_size), t_min=t_min,
                               num_timesteps=num_timesteps)

    def sample_times(self, rng: jax.Array, example_id_B: jax.Array, num_examples: int) -> jax.Array:
        """Stratified float32 times t_B: in [t_min, 1], or on {1/T, ..., 1} when T > 0."""
        if self.num_timesteps > 0:
            return schedules.sample_grid_times(rng, example_id_B, num_examples, self.num_timesteps)
        return schedules.sample_times(rng, example_id_B, num_examples, self.t_min)

    def corrupt(
        self,
        tokens_BL: jax.Array,
        t_B: jax.Array,
        rng: jax.Array,
        example_id_B: jax.Array | None = None,
        given_BL: jax.Array | None = None,
    ) -> jax.Array:
        """x_t: int32 [B, L], each token replaced by mask_id with probability 1 - alpha(t),
        except where `given_BL` (bool [B, L], the prompt) is True.

        Example b draws from fold_in(rng, example_id_B[b]) (default example_id_B: 0..B-1).
        """
        mask_prob_BL = jnp.broadcast_to(self.schedule.mask_prob(t_B)[:, None], tokens_BL.shape)
        if given_BL is not None:
            mask_prob_BL = jnp.where(given_BL, 0.0, mask_prob_BL)
        return mask_tokens(tokens_BL, mask_prob_BL, rng, example_id_B, self.mask_id)

    def subs_log_probs(self, logits_BLV: jax.Array, xt_BL: jax.Array) -> jax.Array:
        """float32 log p(x_0 | x_t), [B, L, V]; see `subs_log_probs`."""
        return subs_log_probs(logits_BLV, xt_BL, self.mask_id)

    def time_weight(self, t_B: jax.Array) -> jax.Array:
        """float32 [B]: the weight multiplying -log p(x_0^i | x_t) at masked positions."""
        if self.num_timesteps == 0:
            return self.schedule.loss_weight(t_B)
        s_B = t_B - 1.0 / self.num_timesteps
        mask_prob_t_B = self.schedule.mask_prob(t_B)
        unmask_prob_B = (mask_prob_t_B - self.schedule.mask_prob(s_B)) / mask_prob_t_B
        return self.num_timesteps * unmask_prob_B

    def noised(self, batch: process.Batch, rng: jax.Array, num_examples: int
               ) -> tuple[jax.Array, jax.Array]:
        """(t_B, x_t_BL): the batch's stratified times and its tokens corrupted at them (what
        `token_losses` scores; one draw per example, keyed by `example_id`)."""
        example_id_B = batch["example_id"]
        time_rng, mask_rng = jax.random.split(rng)
        t_B = self.sample_times(time_rng, example_id_B, num_examples)
        return t_B, self.corrupt(batch["tokens"], t_B, mask_rng, example_id_B,
                                 process.given_mask(batch))

    def token_losses(
        self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, num_examples: int
    ) -> jax.Array:
        """float32 [B, L]: per-token NELBO estimates; 0 at unmasked and padding positions."""
        tokens_BL = batch["tokens"]
        t_B, xt_BL = self.noised(batch, rng, num_examples)
        logits_BLV = model_fn(xt_BL, t_B, **process.attention_options(batch))
        log_probs_BLV = self.subs_log_probs(logits_BLV, xt_BL)
        log_p_BL = jnp.take_along_axis(log_probs_BLV, tokens_BL[..., None], axis=-1)[..., 0]
        loss_BL = -self.time_weight(t_B)[:, None] * log_p_BL
        # `where`, not a product: log_p is -inf at padding that holds the mask id.
        return jnp.where(batch["loss_mask"] > 0, loss_BL, 0.0)

    def loss(
        self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *, num_examples: int,
        state=None, frozen=None,
    ) -> tuple[jax.Array, process.Metrics]:
        """See `process.Process.loss`; the mean is over all real tokens, masked or not. The
        process has no state."""
        del state, frozen
        loss_sum = jnp.sum(self.token_losses(model_fn, batch, rng, num_examples))
        token_count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        loss = loss_sum / jnp.maximum(token_count, 1.0)
        return loss, {"loss_sum": loss_sum, "token_count": token_count}

    def nll(
        self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *, num_examples: int,
        state=None, frozen=None,
    ) -> tuple[jax.Array, jax.Array]:
        """See `process.Process.nll`: one-sample NELBO estimates per sequence, float32 [B]."""
        del state, frozen
        nll_sum_B = jnp.sum(self.token_losses(model_fn, batch, rng, num_examples), axis=-1)
        token_count_B = jnp.sum(batch["loss_mask"].astype(jnp.float32), axis=-1)
        return nll_sum_B, token_count_B
