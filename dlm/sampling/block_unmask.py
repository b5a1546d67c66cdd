"""Block diffusion (BD3-LM) sampling: blocks left to right, masked diffusion inside each.

The sequence is cut into blocks of b tokens at absolute positions 0, b, 2b, ... (as in
training). Each loop step works on the current block: the first one in which any row has an
open position (the rows move in lockstep, since they share one cache). The committed blocks
before it that the cache does not hold yet are encoded into it (one network call each, so a
committed block is encoded once), the network scores the current block alone against the
cache, and the inner `Unmask` rule commits positions of the block exactly as it would for a
sequence of b tokens, so every one of its policies (first hitting, MDLM's grid, fixed counts,
confidence thresholds, nucleus sampling) works inside blocks. Without the KV cache the
network runs on the whole sequence every step instead (the reference the cached sampler
equals, under the same key).

The cache keeps `window` committed positions in view; when it is full the oldest block is
dropped first (keys keep their absolute RoPE positions, so the relative geometry of what
stays is unchanged), so a sample may be longer than the training context. With
`Stop(at_eos)` a row ends at its first generated EOS: the positions after it are filled, so
later blocks have nothing open, and the loop ends once every row has ended.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from dlm.sampling.state import SamplerState
from dlm.sampling.unmask import Unmask


@struct.dataclass
class BlockCarry:
    """What `BlockUnmask` carries in `SamplerState.cache`."""

    kv: Any  # the network's cache of committed blocks (None without the KV cache)
    encoded: jax.Array  # int32 []: blocks 0..encoded-1 went through the cache
    block: jax.Array  # int32 []: the current block (-1 before the first step)
    block_start: jax.Array  # int32 []: the loop step at which the current block started
    sub_B: jax.Array  # int32 [B]: each row's active sub-block at the last refresh (sub_cache)
    inner: Any = None  # the inner rule's own carry (its step history), or None


@dataclasses.dataclass(frozen=True)
class BlockUnmask:
    """A block diffusion step rule for a `BlockDenoiser`.

    Attributes:
      inner: the masked-diffusion rule applied inside each block (no `cache_logits`, no
        approximate cache of its own); its step budget and time plan are per block, and its
        `block_length` cuts each block into sub-blocks decoded left to right (Fast-dLLM
        v2's sub-blocks).
      block_size: b; None: the network's (a different b is an error: the network's
        attention mask is built for its own).
      kv_cache: encode committed blocks once into a KV cache and run the network on the
        current block only; False: a full forward over the whole sequence every step.
      window: committed positions the current block sees through the cache (a multiple of
        b); None: the most that fit the network's training context together with the
        current block, or everything when it has none.
      sub_cache: Fast-dLLM v2's hierarchical cache: besides the exact cache of committed
        blocks, the block's own keys/values are cached when a sub-block starts (one call
        over the block), and the steps inside a sub-block run the sub-block alone against
        both (a dual cache over sub-blocks); needs `kv_cache` and the inner `block_length`.
        The rows share the refresh: it happens when any row's sub-block changes.
    """

    inner: Unmask = Unmask()
    block_size: int | None = None
    kv_cache: bool = True
    window: int | None = None
    sub_cache: bool = False

    network_kind: ClassVar[str] = "block"
    uses_prefix: ClassVar[bool] = False

    def __post_init__(self):
        if self.inner.cache_logits or self.inner.kv is not None:
            raise ValueError("the inner rule of a block sampler takes no cache_logits and no "
                             "approximate KV cache of its own")
        if self.sub_cache and (self.inner.block_length is None or not self.kv_cache):
            raise ValueError("the sub-block cache (Fast-dLLM v2) needs sub-blocks (the inner "
                             "block_length) and kv_cache=True")
        for name in ("block_size", "window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        if self.window is not None and not self.kv_cache:
            raise ValueError("window slides over the KV cache; it needs kv_cache=True")
        if self.window is not None and self.block_size is not None:
            _check_window(self.window, self.block_size)

    def for_network(self, network) -> BlockUnmask:
        """The rule with `block_size` set from `network` (a BlockDenoiser; ValueError if the
        sizes disagree)."""
        if self.block_size is not None and self.block_size != network.block_size:
            raise ValueError(f"block_size={self.block_size}, but the network was trained with "
                             f"blocks of {network.block_size} (its attention mask is built "
                             "for them)")
        if self.window is not None:
            _check_window(self.window, network.block_size)
        return dataclasses.replace(self, block_size=network.block_size)

    def num_blocks(self, length: int) -> int:
        """L / b (ValueError when b does not divide the length L)."""
        b = self._resolved_block_size()
        if length % b:
            raise ValueError(f"block diffusion sampling needs a length divisible by the block "
                             f"size {b}, got length={length}")
        return length // b

    def max_steps(self, length: int, prefix_len: int = 0) -> int:
        del prefix_len
        b = self._resolved_block_size()
        return self.num_blocks(length) * self.inner.max_steps(b)

    def cache_window(self, network, length: int) -> int:
        """Committed positions in view of the current block: `window`, else the largest
        multiple of b that fits the training context with the block (at least b), else all;
        never more than the L - b that exist."""
        b = self._resolved_block_size()
        if self.window is not None:
            window = self.window
        elif network.context_len is not None:
            window = max(b, (network.context_len - b) // b * b)
        else:
            window = length - b
        return min(window, length - b)

    def init(self, network, params, state: SamplerState, prefix_len: int) -> SamplerState:
        rule = self.for_network(network)
        batch, length = state.tokens_BL.shape
        rule.num_blocks(length)  # validates the length
        kv = None
        if rule.kv_cache:
            b = rule.block_size
            kv = network.init_cache_fn(batch, rule.cache_window(network, length) + b)
        if rule.sub_cache and network.partial_fn is None:
            raise ValueError("this block diffusion network has no partial forward "
                             "(BlockDenoiser.partial_fn), which the sub-block cache needs")
        inner = None
        if rule.inner.history is not None:
            vocab = jax.eval_shape(network.forward_fn, params, state.tokens_BL).shape[-1]
            inner = rule.inner.own_carry(None, batch, rule.block_size, vocab)
        zero = jnp.zeros((), jnp.int32)
        return state.replace(cache=BlockCarry(kv=kv, encoded=zero, block=zero - 1,
                                              block_start=zero,
                                              sub_B=jnp.full((batch,), -1, jnp.int32),
                                              inner=inner))

    def step(self, network, params, state: SamplerState, key: jax.Array) -> SamplerState:
        rule = self.for_network(network)
        state, new_block = rule.enter(network, params, state)
        if rule.sub_cache:
            carry = state.cache
            logits_BTV, kv, sub_B, positions = rule._sub_block_logits(
                network, params, rule._sub_state(state), carry.kv, carry.block * rule.block_size,
                new_block, carry.sub_B)
            state = state.called(positions).replace(cache=carry.replace(kv=kv, sub_B=sub_B))
        else:
            logits_BTV = rule.scope_logits(network, params, state)
            state = state.called(rule.call_positions(state.tokens_BL.shape[1]))
        return rule.advance(network, state, logits_BTV, key)

    def enter(self, network, params, state: SamplerState) -> tuple[SamplerState, jax.Array]:
        """The bookkeeping before a step of a rule resolved `for_network`: the current block
        (the first with an open position in any row), t reset when it is new, and, with the
        KV cache, the committed blocks before it encoded (their calls counted). Returns
        (state, whether the block is new)."""
        b = self._resolved_block_size()
        batch, length = state.tokens_BL.shape
        carry = state.cache
        open_N = jnp.any(state.open_BL(network.vocab.mask_id).reshape(batch, length // b, b),
                         axis=(0, 2))
        block = jnp.argmax(open_N).astype(jnp.int32)
        new_block = block != carry.block
        kv, encoded = carry.kv, carry.encoded
        if self.kv_cache:
            kv, encoded, _ = self.encode_before(network, params, state.tokens_BL, block,
                                                (kv, encoded, state.nfe))
        # An encoding call runs one block.
        state = state.called(b, encoded - carry.encoded).replace(
            t_B=jnp.where(new_block, jnp.ones_like(state.t_B), state.t_B),
            cache=carry.replace(kv=kv, encoded=encoded, block=block,
                                block_start=jnp.where(new_block, state.step,
                                                      carry.block_start)))
        return state, new_block

    def call_positions(self, length: int) -> int:
        """Query positions per row of one `scope_logits` call: the block with the cache,
        the whole sequence without it."""
        return self._resolved_block_size() if self.kv_cache else length

    def scope_done(self, network, state: SamplerState) -> jax.Array:
        """bool []: no row has an open position left in the current block (after `enter`)."""
        sub_open_BT = _cut(state.open_BL(network.vocab.mask_id), state.cache.block *
                           self._resolved_block_size(), self._resolved_block_size())
        return ~jnp.any(sub_open_BT)

    def scope_logits(self, network, params, state: SamplerState) -> jax.Array:
        """float32 [B, b, V]: the network's logits for the current block of `state` (after
        `enter`), against the cache of committed blocks or from a full forward; uncounted."""
        b = self._resolved_block_size()
        carry = state.cache
        start = carry.block * b
        if self.kv_cache:
            logits_BTV, _ = network.decode_fn(params, _cut(state.tokens_BL, start, b), carry.kv,
                                              block_positions(start, state.tokens_BL.shape[0], b))
        else:
            logits_BTV = _cut(network.forward_fn(params, state.tokens_BL), start, b)
        return logits_BTV.astype(jnp.float32)

    def advance(self, network, state: SamplerState, logits_BTV: jax.Array,
                key: jax.Array) -> SamplerState:
        """The inner rule's update of the current block (after `enter`) given its logits
        [B, b or s, V], pasted back into the sequence."""
        b = self._resolved_block_size()
        start = state.cache.block * b
        sub = self._sub_state(state)
        after = self.inner.update(network, sub, logits_BTV.astype(jnp.float32), key)
        mask_id = network.vocab.mask_id
        committed_BT = sub.open_BL(mask_id) & ~after.open_BL(mask_id)
        reopened_BT = ~sub.open_BL(mask_id) & after.open_BL(mask_id)  # remasking policies
        commit_step_BT = jnp.where(committed_BT, state.step, jnp.where(
            reopened_BT, -1, _cut(state.commit_step_BL, start, b)))

        def paste(x_BL, x_BT):
            return lax.dynamic_update_slice_in_dim(x_BL, x_BT, start, axis=1)

        return state.replace(
            tokens_BL=paste(state.tokens_BL, after.tokens_BL),
            confidence_BL=paste(state.confidence_BL, after.confidence_BL),
            commit_step_BL=paste(state.commit_step_BL, commit_step_BT),
            t_B=after.t_B, remasked_B=after.remasked_B,
            cache=state.cache.replace(inner=after.cache))

    def _sub_state(self, state: SamplerState) -> SamplerState:
        """The current block of `state` as a sequence of b tokens, its steps (the step and
        the commit steps) counted from the block's start (what the inner rule sees; a
        position filled before the block started, after an EOS, counts as committed at -1)."""
        b = self._resolved_block_size()
        carry = state.cache
        start = carry.block * b
        commit_step_BT = _cut(state.commit_step_BL, start, b)
        return state.replace(
            tokens_BL=_cut(state.tokens_BL, start, b), known_BL=_cut(state.known_BL, start, b),
            confidence_BL=_cut(state.confidence_BL, start, b),
            commit_step_BL=jnp.where(commit_step_BT >= 0, jnp.maximum(
                commit_step_BT - carry.block_start, -1), -1),
            step=state.step - carry.block_start, cache=carry.inner)

    def _sub_block_logits(self, network, params, sub: SamplerState, kv, start, new_block,
                          last_sub_B):
        """Fast-dLLM v2's sub-block cache for one step of a rule resolved `for_network`:
        (logits of each row's sub-block window [B, s, V], the cache holding the block's
        keys/values after the committed blocks, each row's sub-block, query positions).

        At a new block or sub-block, one call runs the whole block against the committed
        blocks and its keys/values stay in the cache's slots after them (its length is kept,
        so encoding the committed block later overwrites them); otherwise the sub-block
        alone runs against both, its own keys/values written back.
        """
        b = self._resolved_block_size()
        s = self.inner.window_size(b)
        batch = sub.tokens_BL.shape[0]
        blocks = self.inner.blocks(sub, sub.open_BL(network.vocab.mask_id))
        idx_BS = blocks.window_start_B[:, None] + jnp.arange(s, dtype=jnp.int32)
        refresh = new_block | jnp.any((blocks.active_B != last_sub_B) & ~sub.done_B)

        def whole_block():
            logits_BTV, with_block = network.decode_fn(params, sub.tokens_BL, kv,
                                                       block_positions(start, batch, b))
            logits_BSV = jnp.take_along_axis(logits_BTV, idx_BS[..., None], axis=1)
            return logits_BSV.astype(jnp.float32), with_block.replace(length=kv.length)

        def sub_block():
            tokens_BS = jnp.take_along_axis(sub.tokens_BL, idx_BS, axis=1)
            logits_BSV, with_sub = network.partial_fn(params, tokens_BS, start + idx_BS, kv,
                                                      kv.length + idx_BS)
            return logits_BSV.astype(jnp.float32), with_sub.replace(length=kv.length)

        logits_BSV, kv = lax.cond(refresh, whole_block, sub_block)
        sub_B = jnp.where(refresh, blocks.active_B, last_sub_B)
        return logits_BSV, kv, sub_B, jnp.where(refresh, b, s)

    def encode_before(self, network, params, tokens_BL: jax.Array, block: jax.Array,
                      kv_encoded_nfe: tuple) -> tuple:
        """Encodes blocks `encoded`, ..., `block` - 1 of tokens_BL [B, L] into the cache of a
        rule resolved `for_network`: one network call per block, the oldest block dropped
        first when the cache holds `cache_window` positions.

        Returns (kv, encoded, nfe) after them, from (kv, encoded, nfe) before.
        """
        b = self._resolved_block_size()
        batch, length = tokens_BL.shape
        window_blocks = self.cache_window(network, length) // b

        def cond_fn(carry):
            return carry[1] < block

        def body_fn(carry):
            kv, encoded, nfe = carry
            if window_blocks < length // b - 1:  # else the cache never fills
                kv = lax.cond(encoded >= window_blocks, lambda c: c.dropped_oldest(b),
                              lambda c: c, kv)
            start = encoded * b
            tokens_BT = lax.dynamic_slice_in_dim(tokens_BL, start, b, axis=1)
            _, kv = network.decode_fn(params, tokens_BT, kv, block_positions(start, batch, b))
            return kv, encoded + 1, nfe + 1

        return lax.while_loop(cond_fn, body_fn, kv_encoded_nfe)

    def _resolved_block_size(self) -> int:
        if self.block_size is None:
            raise ValueError("block_size is the network's: resolve it with for_network first")
        return self.block_size


def _cut(x_BL: jax.Array, start: jax.Array, size: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x_BL, start, size, axis=1)


def block_positions(start: jax.Array, batch: int, block_size: int) -> jax.Array:
    """int32 [B, b]: the absolute positions start .. start + b - 1 of a block."""
    positions_T = start + jnp.arange(block_size, dtype=jnp.int32)
    return jnp.broadcast_to(positions_T, (batch, block_size))


def _check_window(window: int, block_size: int) -> None:
    if window < block_size or window % block_size:
        raise ValueError(f"window={window} must be a positive multiple of the block size "
                         f"{block_size}")
