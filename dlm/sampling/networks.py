"""The networks as samplers call them: a masked denoiser, a block diffusion denoiser with a
KV cache of committed blocks, a causal LM with a KV cache, or a denoiser with an energy.

Each class names its `kind` (one of NETWORK_KINDS); each step rule names the kind it needs
(`network_kind`), and `engine.check_network` compares the two. Samplers are jit-compiled with
the network as a static argument, so every object here is a frozen dataclass that compares
and hashes by value: rebuilding the same network for the same module reuses the compiled
sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax

from dlm.diffusion import schedules

# What a sampler may need: a masked denoiser, a block diffusion denoiser, a causal LM, a
# masked denoiser corrected by an energy, or a causal LM with a masked denoiser drafting for it.
NETWORK_KINDS = ("denoiser", "block", "causal", "denoiser+energy", "denoiser+causal")
# What each kind is called in messages (a run's or a network's).
KIND_NAMES = {"denoiser": "masked diffusion", "block": "block diffusion",
              "causal": "autoregressive", "denoiser+energy": "masked diffusion + energy",
              "energy": "EDLM energy",
              "denoiser+causal": "autoregressive + diffusion drafter"}


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
      partial_fn: optional hashable `(params, tokens_BN, positions_BN, cache, t_B, write_BN)
        -> (logits_BNV float32, cache)`: N tokens at absolute positions positions_BN
        (distinct per row) against a cache of every position's keys/values, their own
        written into it where write_BN (the approximate KV caches of `kv_reuse`); over all L
        positions of an empty cache, the plain forward. None: the network has none.
      init_cache_fn: hashable `(batch, length) -> cache`, empty (with `partial_fn`).
    """

    apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
    vocab: Vocab
    schedule: schedules.Schedule = schedules.LogLinearSchedule()
    time_conditioned: bool = False
    partial_fn: Callable[..., tuple[jax.Array, Any]] | None = None
    init_cache_fn: Callable[[int, int], Any] | None = None

    kind: ClassVar[str] = "denoiser"


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

    kind: ClassVar[str] = "causal"


@dataclasses.dataclass(frozen=True)
class BlockDenoiser:
    """A block diffusion (BD3-LM) network: masked diffusion inside blocks of `block_size`
    tokens at absolute positions 0, b, 2b, ..., autoregressive across blocks.

    Clean (committed) blocks attend block-causally to the clean blocks before them; the noisy
    block being denoised attends to those and, bidirectionally, to itself (the x_0 and x_t
    streams of training, under the mask 'block_causal:b').

    Attributes:
      decode_fn: hashable `(params, tokens_BT int32, cache, positions_BT int32) ->
        (logits_BTV float32, cache)`: runs T (a multiple of b) tokens at absolute positions
        `positions_BT` (RoPE) against the cache, which holds whole blocks; the returned cache
        has them appended. Keep it to commit the blocks, drop it to score a noisy block.
      forward_fn: hashable `(params, tokens_BL) -> logits_BLV float32`: the whole sequence at
        positions 0..L-1 without a cache (each block sees itself and the blocks before it).
      init_cache_fn: hashable `(batch, max_len) -> cache`, an empty cache of max_len slots
        (a `KVCache`, or any pytree with its `dropped_oldest(num)` for the sliding window).
      vocab: its special ids.
      schedule: the noise schedule it was trained with.
      block_size: b, the block size it was trained with.
      context_len: the sequence length it was trained on (None: unknown); samplers keep
        at most this many positions in view (a sliding window over the cache).
      partial_fn: optional hashable `(params, tokens_BN, positions_BN, cache, slots_BN,
        write_BN) -> (logits_BNV float32, cache)`: N tokens at absolute positions
        positions_BN (RoPE) and cache slots slots_BN, against the cache (Fast-dLLM v2's
        sub-block cache, `BlockUnmask.sub_cache`). None: the network has none.
    """

    decode_fn: Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
    forward_fn: Callable[[Any, jax.Array], jax.Array]
    init_cache_fn: Callable[[int, int], Any]
    vocab: Vocab
    schedule: schedules.Schedule
    block_size: int
    context_len: int | None = None
    partial_fn: Callable[..., tuple[jax.Array, Any]] | None = None

    kind: ClassVar[str] = "block"


@dataclasses.dataclass(frozen=True)
class EnergyDenoiser:
    """A masked denoiser corrected by a sequence-level energy (EDLM): params are
    {"denoiser": ..., "energy": ...}.

    Attributes:
      denoiser: the masked-diffusion network.
      energy: hashable `(params, x0_BL, xt_BL, t_B, log_p_BL, mask_id) -> E_B` (see
        `importance.Energy`): low energy = more likely.
    """

    denoiser: Denoiser
    energy: Callable[..., jax.Array]

    kind: ClassVar[str] = "denoiser+energy"

    @property
    def vocab(self) -> Vocab:
        return self.denoiser.vocab

    @property
    def schedule(self) -> schedules.Schedule:
        return self.denoiser.schedule


@dataclasses.dataclass(frozen=True)
class DraftedCausalLM:
    """A causal LM (the target, whose law the samples follow) with a masked denoiser that
    drafts its next tokens (DiffuSpec, `speculative`): params are {"drafter": ...,
    "target": ...}.

    Both read one tokenizer: their `Vocab`s (mask, EOS and pad ids) must be equal, and the
    sampler checks when tracing that their logits cover one vocabulary size.

    Attributes:
      drafter: the masked-diffusion network (bidirectional, one forward per draft).
      target: the causal LM that verifies the drafts through its KV cache.
    """

    drafter: Denoiser
    target: CausalLM

    kind: ClassVar[str] = "denoiser+causal"

    def __post_init__(self):
        if self.drafter.vocab != self.target.vocab:
            raise ValueError(f"the drafter and the target must share one vocabulary (the same "
                             f"tokenizer): drafter {self.drafter.vocab}, target "
                             f"{self.target.vocab}")

    @property
    def vocab(self) -> Vocab:
        return self.target.vocab


def _unpadded(tokens, pad_id: int | None, key: str) -> dict:
    """{key: tokens != pad_id} for a network that never attends to PAD (trained with the
    pad fill, `dlm.data.sft`), else {}."""
    return {} if pad_id is None else {key: tokens != pad_id}


@dataclasses.dataclass(frozen=True)
class _FlaxDenoise:
    module: Any  # flax.linen.Module (hashable by value)
    pad_id: int | None = None  # set: PAD keys are never attended

    def __call__(self, params, tokens_BL, t_B):
        return self.module.apply({"params": params}, tokens_BL, t_B, train=False,
                                 **_unpadded(tokens_BL, self.pad_id, "kv_valid_BL"))


@dataclasses.dataclass(frozen=True)
class _FlaxPartial:
    module: Any
    pad_id: int | None = None

    def __call__(self, params, tokens_BN, positions_BN, cache, t_B, write_BN=None):
        valid = None if self.pad_id is None else tokens_BN != self.pad_id
        return self.module.apply({"params": params}, tokens_BN, cache, positions_BN, t_B,
                                 valid_BN=valid, write_BN=write_BN, method="partial")


@dataclasses.dataclass(frozen=True)
class _FlaxBlockPartial:
    module: Any
    mask: str
    pad_id: int | None = None

    def __call__(self, params, tokens_BN, positions_BN, cache, slots_BN, write_BN=None):
        valid = None if self.pad_id is None else tokens_BN != self.pad_id
        return self.module.apply({"params": params}, tokens_BN, cache, positions_BN,
                                 valid_BN=valid, write_BN=write_BN, mask=self.mask,
                                 slots_BN=slots_BN, method="partial")


@dataclasses.dataclass(frozen=True)
class _FlaxDecode:
    module: Any
    pad_id: int | None = None

    def __call__(self, params, tokens_BT, cache):
        return self.module.apply({"params": params}, tokens_BT, cache, method="decode",
                                 **_unpadded(tokens_BT, self.pad_id, "valid_BT"))


@dataclasses.dataclass(frozen=True)
class _FlaxBlockDecode:
    module: Any
    mask: str  # 'block_causal:b'
    pad_id: int | None = None

    def __call__(self, params, tokens_BT, cache, positions_BT):
        return self.module.apply({"params": params}, tokens_BT, cache, positions_BT=positions_BT,
                                 mask=self.mask, method="decode",
                                 **_unpadded(tokens_BT, self.pad_id, "valid_BT"))


@dataclasses.dataclass(frozen=True)
class _FlaxBlockForward:
    module: Any
    mask: str
    pad_id: int | None = None

    def __call__(self, params, tokens_BL):
        return self.module.apply({"params": params}, tokens_BL, None, train=False,
                                 mask=self.mask,
                                 **_unpadded(tokens_BL, self.pad_id, "kv_valid_BL"))


@dataclasses.dataclass(frozen=True)
class _FlaxInitCache:
    module: Any

    def __call__(self, batch, max_len):
        from dlm.models.kv_cache import KVCache  # the models package imports flax modules

        return KVCache.init(self.module.config, batch, max_len)


def from_flax(module, process, tokenizer=None, context_len: int | None = None,
              pad_unattended: bool = False) -> Denoiser | BlockDenoiser | CausalLM:
    """Wraps a Flax module as the network its `process` trained: by `process.network_kind`,
    a DiT as a Denoiser ('denoiser') or a BlockDenoiser ('block', blocks of
    `process.block_size`), a Transformer as a CausalLM ('causal').

    `tokenizer` (optional) supplies the EOS and pad ids for end-of-text policies;
    `context_len` (optional) is the training sequence length, the default view of a block
    diffusion sampler; `pad_unattended` (a network trained with the pad fill of
    `dlm.data.sft`, which never saw PAD as a key) keeps the tokenizer's PAD out of attention.
    Raises ValueError for another kind (no sampler takes it) or a time-conditioned block
    diffusion network.
    """
    kind = process.network_kind
    if kind not in ("denoiser", "block", "causal"):
        raise ValueError(f"a {type(process).__name__} process trains a {kind!r} network, which "
                         "no sampler takes (from_flax wraps 'denoiser', 'block' and 'causal' "
                         "networks)")
    mask_id = process.mask_id
    if mask_id is None:  # Autoregressive's default: the last vocabulary entry
        mask_id = module.vocab_size - 1
    vocab = Vocab(mask_id=int(mask_id),
                  eos_id=None if tokenizer is None else tokenizer.eos_id,
                  pad_id=None if tokenizer is None else tokenizer.pad_id)
    if pad_unattended and vocab.pad_id is None:
        raise ValueError("pad_unattended needs the tokenizer's pad id")
    pad_id = vocab.pad_id if pad_unattended else None
    if kind == "causal":
        return CausalLM(_FlaxDecode(module, pad_id), _FlaxInitCache(module), vocab)
    if kind == "denoiser":
        partial = None if module.config.get("shift_logits", False) else _FlaxPartial(module,
                                                                                     pad_id)
        return Denoiser(_FlaxDenoise(module, pad_id), vocab, process.schedule,
                        bool(module.config.get("time_conditioning", False)), partial,
                        None if partial is None else _FlaxInitCache(module))
    if module.config.get("time_conditioning", False):
        raise ValueError("block diffusion sampling does not support a time-conditioned "
                         "network (model.time_conditioning=True)")
    block_size = int(process.block_size)
    mask = f"block_causal:{block_size}"
    return BlockDenoiser(_FlaxBlockDecode(module, mask, pad_id),
                         _FlaxBlockForward(module, mask, pad_id),
                         _FlaxInitCache(module), vocab, process.schedule, block_size,
                         None if context_len is None else int(context_len),
                         _FlaxBlockPartial(module, mask, pad_id))
