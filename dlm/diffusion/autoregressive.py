"""Autoregressive language modelling as a degenerate process: next-token cross-entropy.

Convention: the network sees the full tokens_BL under a causal mask, and its logits at
position i predict token i + 1. The loss covers positions where both token i and token i + 1
are real (loss_mask = 1), so a full sequence of length L scores L - 1 tokens: the first token
(the BOS in "wrap" packing) is never predicted, and the logits at the last position are unused.
The mask token gets zero probability. No randomness is used and the time argument is None.

Prompt/response data (supervised fine-tuning): the loss covers the response tokens (and
their fill) only, each predicted from everything before it, the prompt included: a target
i + 1 counts where loss_mask[i + 1] = 1 and token i is real (`valid`). Padding is never
attended.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dlm.diffusion import process


@process.PROCESSES.register("ar")
@dataclasses.dataclass(frozen=True)
class Autoregressive(process.Process):
    """Causal next-token prediction.

    Attributes:
      mask_id: the token given zero probability; None means the last vocabulary entry, V - 1.
    """

    mask_id: int | None = None

    models: ClassVar[tuple[str, ...]] = ("transformer",)
    network_kind: ClassVar[str] = "causal"
    exportable: ClassVar[bool] = True
    conditional: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config, vocab_size: int) -> Autoregressive:
        """The AR process; the mask id (`process.mask_id`, default V - 1) gets zero
        probability."""
        return Autoregressive(mask_id=process.mask_id_of(config, vocab_size))

    def token_losses(
        self, model_fn: process.ModelFn, batch: process.Batch
    ) -> tuple[jax.Array, jax.Array]:
        """(nll_BL, target_mask_BL), float32 [B, L - 1]: -log p(token i+1 | tokens <= i)."""
        tokens_BL = batch["tokens"]
        logits_BLV = model_fn(tokens_BL, None, **process.attention_options(batch))
        mask_id = logits_BLV.shape[-1] - 1 if self.mask_id is None else self.mask_id
        log_probs_BLV = jax.nn.log_softmax(process.exclude_token(logits_BLV[:, :-1], mask_id))
        targets_BL = tokens_BL[:, 1:]
        nll_BL = -jnp.take_along_axis(log_probs_BLV, targets_BL[..., None], axis=-1)[..., 0]
        loss_mask_BL = batch["loss_mask"].astype(jnp.float32)
        input_mask_BL = batch.get("valid", loss_mask_BL).astype(jnp.float32)
        target_mask_BL = loss_mask_BL[:, 1:] * input_mask_BL[:, :-1]
        # `where`, not a product: nll is +inf at padding that holds the mask id.
        return jnp.where(target_mask_BL > 0, nll_BL, 0.0), target_mask_BL

    def loss(
        self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *, num_examples: int,
        state=None, frozen=None,
    ) -> tuple[jax.Array, process.Metrics]:
        """See `process.Process.loss`; rng, num_examples, state and frozen are unused."""
        del rng, num_examples, state, frozen
        nll_BL, target_mask_BL = self.token_losses(model_fn, batch)
        loss_sum = jnp.sum(nll_BL)
        token_count = jnp.sum(target_mask_BL)
        loss = loss_sum / jnp.maximum(token_count, 1.0)
        return loss, {"loss_sum": loss_sum, "token_count": token_count}

    def nll(
        self, model_fn: process.ModelFn, batch: process.Batch, rng: jax.Array, *, num_examples: int,
        state=None, frozen=None,
    ) -> tuple[jax.Array, jax.Array]:
        """See `process.Process.nll`: the exact NLL of tokens 1..L-1, float32 [B] each."""
        del rng, num_examples, state, frozen
        nll_BL, target_mask_BL = self.token_losses(model_fn, batch)
        return jnp.sum(nll_BL, axis=-1), jnp.sum(target_mask_BL, axis=-1)
