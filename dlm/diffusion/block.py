"""Block diffusion (BD3-LM): masked diffusion inside blocks, autoregressive across them.

A sequence of length L is cut into L / b blocks of b tokens. Each block gets its own noise
level t_j and is corrupted as in MDLM; the denoiser predicts block j's clean tokens from its
noisy version and the clean blocks before it. All blocks train in one forward pass over
x_t ⊕ x_0 (length 2L) with the two-stream mask `MaskSpec.bd3lm(b)` (x_t block-diagonal, x_t
to x_0 strictly earlier blocks, x_0 block-causal); both halves use positions 0..L-1 and only
the x_t half gets logits.

Loss per real token, zero where x_t is clean: w(t_j) * -log p(x_0^i | x_t^j, x_0^{<j}) with
MDLM's weight w(t) = -alpha'(t) / (1 - alpha(t)). Block times are antithetically stratified
over the global batch x blocks. With b = L this is MDLM's loss; with b = 1 its expectation is
the exact autoregressive NLL of the same network (each token is either clean, costing 0, or
masked with probability m(t) and weighted by w(t) = 1 / m(t) under the log-linear schedule).

Clipped schedules (BD3-LM): training draws t ~ U[beta, omega] (never below t_min) from the
*process state* `{"clip": float32 [2]}`, which the trainer checkpoints and may refresh with
`search_state`: the interval among the configured widths with the lowest variance of the
per-block NELBO estimate on validation batches. The reported NELBO (`nll`) always draws
t ~ U[t_min, 1], the unclipped bound.

Prompt/response data (supervised fine-tuning): the prompt sits clean in both streams (it is
never masked in x_t) and scores nothing. Blocks stay at absolute positions 0, b, 2b, ..., so a
prompt that ends inside a block leaves that block partly given: its prompt positions are
clean context and its response positions are noised at the block's time t_j, exactly what the
`bd3lm` sampler meets when it decodes that block with the prompt positions known. Padding is
never attended, in either stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from dlm.diffusion import masked, process, schedules
from dlm.models.masks import MaskSpec

UNCLIPPED = (0.0, 1.0)


@process.PROCESSES.register("bd3lm")
@dataclasses.dataclass(frozen=True)
class BlockDiffusion(process.Process):
    """BD3-LM's block diffusion process.

    Attributes:
      schedule: the noise schedule alpha(t).
      mask_id: the absorbing token (V - 1).
      block_size: b, tokens per block; must divide the sequence length.
      t_min: smallest training / evaluation time.
      clip: the initial training interval [beta, omega] (the process state starts here).
      clip_search_widths: interval widths tried by `search_state` (empty: no search).
      clip_search_step: spacing of the candidate intervals' lower ends.
    """

    schedule: schedules.Schedule
    mask_id: int
    block_size: int
    t_min: float = 1e-3
    clip: tuple[float, float] = UNCLIPPED
    clip_search_widths: tuple[float, ...] = ()
    clip_search_step: float = 0.1

    models: ClassVar[tuple[str, ...]] = ("dit",)
    network_kind: ClassVar[str] = "block"
    exportable: ClassVar[bool] = True
    conditional: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config, vocab_size: int) -> BlockDiffusion:
        """The BD3-LM process of a run config (`config.block_size`, `config.process.clip_*`,
        MDLM's schedule and t_min). Raises ValueError naming the offending key."""
        block_size = config.get("block_size", None)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"config.block_size={block_size!r} must be a positive int for "
                             "process.name='bd3lm'")
        seq_len = config.get("data", {}).get("seq_len", None)
        if isinstance(seq_len, int) and seq_len % block_size:
            raise ValueError(f"config.block_size={block_size} does not divide "
                             f"config.data.seq_len={seq_len}")
        if config.process.get("num_timesteps", 0):
            raise ValueError("process.num_timesteps must be 0 for bd3lm (continuous time only)")
        if config.get("model", {}).get("time_conditioning", False):
            raise ValueError("model.time_conditioning must be False for bd3lm: each block has "
                             "its own noise level and the network is not told any of them")
        clip = (float(config.process.get("clip_min", 0.0)),
                float(config.process.get("clip_max", 1.0)))
        if not 0.0 <= clip[0] < clip[1] <= 1.0:
            raise ValueError(f"process.clip_min={clip[0]}, process.clip_max={clip[1]}: the clip "
                             "interval must satisfy 0 <= clip_min < clip_max <= 1")
        widths = tuple(float(w) for w in config.process.get("clip_search_widths", ()))
        for width in widths:
            if not 0.0 < width <= 1.0:
                raise ValueError(f"process.clip_search_widths holds {width}: widths must lie in "
                                 "(0, 1]")
        step = float(config.process.get("clip_search_step", 0.1))
        if not 0.0 < step <= 1.0:
            raise ValueError(f"process.clip_search_step={step} must lie in (0, 1]")
        base = masked.MaskedDiffusion.from_config(config, vocab_size)
        return BlockDiffusion(schedule=base.schedule, mask_id=base.mask_id,
                              block_size=block_size, t_min=base.t_min, clip=clip,
                              clip_search_widths=widths, clip_search_step=step)

    def init_state(self, frozen_params=None) -> dict[str, jax.Array]:
        """The process state: the training interval `clip`, float32 [2] (whatever the
        weights start from)."""
        del frozen_params
        return {"clip": jnp.asarray(self.clip, jnp.float32)}

    def num_blocks(self, length: int) -> int:
        if length % self.block_size:
            raise ValueError(f"block_size {self.block_size} does not divide the sequence length "
                             f"{length}")
        return length // self.block_size

    def sample_block_times(self, rng: jax.Array, example_id_B: jax.Array, num_examples: int,
                           num_blocks: int, clip=UNCLIPPED) -> jax.Array:
        """float32 [B, num_blocks] times in [max(beta, t_min), omega], one stratum per (example,
        block) of the global batch."""
        batch = example_id_B.shape[0]
        ids_BN = example_id_B[:, None] * num_blocks + jnp.arange(num_blocks)
        u_BN = schedules.stratified_uniform(rng, ids_BN.reshape(-1),
                                            num_examples * num_blocks).reshape(batch, num_blocks)
        low = jnp.maximum(jnp.asarray(clip[0], jnp.float32), self.t_min)
        high = jnp.maximum(jnp.asarray(clip[1], jnp.float32), low)
        return low + (high - low) * u_BN

    def token_losses(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array,
                     num_examples: int, clip=UNCLIPPED) -> jax.Array:
        """float32 [B, L]: per-token NELBO estimates, 0 at clean and padding positions."""
        tokens_BL = batch["tokens"]
        example_id_B = batch["example_id"]
        length = tokens_BL.shape[1]
        time_rng, mask_rng = jax.random.split(rng)
        t_BN = self.sample_block_times(time_rng, example_id_B, num_examples,
                                       self.num_blocks(length), clip)
        t_BL = jnp.repeat(t_BN, self.block_size, axis=1)
        mask_prob_BL = self.schedule.mask_prob(t_BL)
        given_BL = process.given_mask(batch)
        if given_BL is not None:
            mask_prob_BL = jnp.where(given_BL, 0.0, mask_prob_BL)
        xt_BL = masked.mask_tokens(tokens_BL, mask_prob_BL, mask_rng, example_id_B,
                                   self.mask_id)
        positions_L = np.arange(length)  # static, so RoPE's tables are constants
        logits_BLV = model_fn(jnp.concatenate([xt_BL, tokens_BL], axis=1), None,
                              positions_BL=np.concatenate([positions_L, positions_L]),
                              mask=MaskSpec.bd3lm(self.block_size), output_len=length,
                              **process.attention_options(batch, copies=2))
        log_probs_BLV = masked.subs_log_probs(logits_BLV, xt_BL, self.mask_id)
        log_p_BL = jnp.take_along_axis(log_probs_BLV, tokens_BL[..., None], axis=-1)[..., 0]
        loss_BL = -self.schedule.loss_weight(t_BL) * log_p_BL
        # `where`, not a product: log_p is -inf at padding that holds the mask id.
        return jnp.where(batch["loss_mask"] > 0, loss_BL, 0.0)

    def loss(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *,
             num_examples: int, state: dict | None = None, frozen=None
             ) -> tuple[jax.Array, process.Metrics]:
        """See `process.Process.loss`: times drawn from the state's interval (default
        unclipped); the mean is over all real tokens."""
        clip = UNCLIPPED if state is None else state["clip"]
        loss_sum = jnp.sum(self.token_losses(model_fn, batch, rng, num_examples, clip))
        token_count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        loss = loss_sum / jnp.maximum(token_count, 1.0)
        return loss, {"loss_sum": loss_sum, "token_count": token_count}

    def nll(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *,
            num_examples: int, state=None, frozen=None) -> tuple[jax.Array, jax.Array]:
        """See `process.Process.nll`: one-sample unclipped NELBO estimates, float32 [B] (the
        clip interval in `state` is for training only)."""
        del state, frozen
        nll_sum_B = jnp.sum(self.token_losses(model_fn, batch, rng, num_examples), axis=-1)
        token_count_B = jnp.sum(batch["loss_mask"].astype(jnp.float32), axis=-1)
        return nll_sum_B, token_count_B

    # The clipped-schedule search.

    @property
    def searches(self) -> bool:
        return bool(self.clip_search_widths)

    def search_statistic(self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array,
                         *, num_examples: int, candidate: jax.Array) -> jax.Array:
        """float32 [B, L / b]: per-block NELBO estimates (mean over the block's tokens) with
        times drawn from the candidate interval [2]."""
        loss_BL = self.token_losses(model_fn, batch, rng, num_examples, candidate)
        batch_size, length = loss_BL.shape
        loss_BNb = loss_BL.reshape(batch_size, length // self.block_size, self.block_size)
        return jnp.mean(loss_BNb, axis=-1)

    def clip_candidates(self) -> list[tuple[float, float]]:
        """Every [lo, lo + w] inside [0, 1] for w in the widths, lo on the step grid, plus
        the unclipped interval."""
        candidates = {UNCLIPPED}
        for width in self.clip_search_widths:
            starts = np.arange(0.0, 1.0 - width + 1e-9, self.clip_search_step)
            candidates.update((round(float(lo), 6), round(float(lo + width), 6))
                              for lo in starts)
        return sorted(candidates)

    def search_state(self, statistic_of: Callable[[np.ndarray], np.ndarray]
                     ) -> tuple[dict[str, Any], dict[str, float]]:
        """The state with the interval of lowest per-block NELBO variance, and metrics.

        `statistic_of(candidate [2])` returns the per-block NELBO estimates of the validation
        batches for that interval (the same batches and noise for every candidate).
        """
        variances = {c: float(np.var(statistic_of(np.asarray(c, np.float32))))
                     for c in self.clip_candidates()}
        best = min(variances, key=variances.get)
        metrics = {"clip/min": best[0], "clip/max": best[1],
                   "clip/nelbo_var": variances[best],
                   "clip/nelbo_var_unclipped": variances[UNCLIPPED]}
        return {"clip": jnp.asarray(best, jnp.float32)}, metrics
