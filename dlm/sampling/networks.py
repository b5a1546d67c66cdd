"""The networks as samplers call them: a masked denoiser or a causal LM with a KV cache.

Samplers are jit-compiled with the network as a static argument, so every object here is a
frozen dataclass that compares and hashes by value: rebuilding the same network for the same
module reuses the compiled sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from dlm.diffusion import schedules


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The special ids samplers need. `mask_id` marks a position not generated yet."""

    mask_id: int
    eos_id: int | None = None
    pad_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A masked-diffusion network.

    Attributes:
      apply_fn: hashable `(params, tokens_BL int32, t_B float32) -> logits_BLV float32`, raw
        logits over the full vocabulary (the mask column is excluded by the sampler).
      vocab: its special ids.
      schedule: the noise schedule it was trained with (time-based samplers use it).
      time_conditioned: whether the logits depend on t_B (if not, logits can be cached).
    """

    apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
    vocab: Vocab
    schedule: schedules.Schedule = schedules.LogLinearSchedule()
    time_conditioned: bool = False


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """A causal language model decoded through a cache.

    Attributes:
      decode_fn: hashable `(params, tokens_BT, cache) -> (logits_BTV float32, cache)`: appends
        T tokens at the cache's next slots; row t of the logits predicts the token after t.
      init_cache_fn: hashable `(batch, max_len) -> cache`, an empty cache.
      vocab: its special ids (the mask id is never predicted).
    """

    decode_fn: Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]
    init_cache_fn: Callable[[int, int], Any]
    vocab: Vocab


@dataclasses.dataclass(frozen=True)
class _FlaxDenoise:
    module: Any  # flax.linen.Module (hashable by value)

    def __call__(self, params, tokens_BL, t_B):
        return self.module.apply({"params": params}, tokens_BL, t_B, train=False)


@dataclasses.dataclass(frozen=True)
class _FlaxDecode:
    module: Any

    def __call__(self, params, tokens_BT, cache):
        return self.module.apply({"params": params}, tokens_BT, cache, method="decode")


@dataclasses.dataclass(frozen=True)
class _FlaxInitCache:
    module: Any

    def __call__(self, batch, max_len):
        from dlm.models.kv_cache import KVCache  # the models package imports flax modules

        return KVCache.init(self.module.config, batch, max_len)


def from_flax(module, process, tokenizer=None) -> Denoiser | CausalLM:
    """Wraps a DiT (with a MaskedDiffusion process) or a Transformer (with Autoregressive).

    `tokenizer` (optional) supplies the EOS and pad ids for end-of-text policies.
    """
    eos_id = None if tokenizer is None else tokenizer.eos_id
    pad_id = None if tokenizer is None else tokenizer.pad_id
    mask_id = getattr(process, "mask_id", None)
    if mask_id is None:
        mask_id = module.vocab_size - 1
    vocab = Vocab(mask_id=mask_id, eos_id=eos_id, pad_id=pad_id)
    if hasattr(process, "schedule"):
        return Denoiser(_FlaxDenoise(module), vocab, process.schedule,
                        bool(module.config.time_conditioning))
    return CausalLM(_FlaxDecode(module), _FlaxInitCache(module), vocab)
