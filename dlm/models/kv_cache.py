"""A static-shape key/value cache pytree for autoregressive and block-wise decoding."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys and values of every layer for up to `max_len` slots.

    Each decode call appends T tokens (a prompt, one token, or a block) at slot `length`,
    shared by the whole batch; per-row padding is expressed by `valid_BS`, not by lengths.
    Appending past `max_len` is not checked inside jit (dynamic_update_slice clamps), so size
    the cache for prompt + generation.
    """

    k: tuple[jax.Array, ...]  # per layer [B, S_max, K, Dh]
    v: tuple[jax.Array, ...]  # per layer [B, S_max, K, Dh]
    valid_BS: jax.Array  # bool [B, S_max]: slot holds a real (non-padding) token
    length: jax.Array  # int32 []: slots filled so far

    @classmethod
    def init(cls, config: Any, batch: int, max_len: int, dtype: Any = None) -> "KVCache":
        """An empty cache for a model config (keys hidden, heads, kv_heads, layers, dtype);
        `dtype` defaults to the config's compute dtype."""
        head_dim = config.get("head_dim", 0) or config.hidden // config.heads
        kv_heads = config.get("kv_heads") or config.heads
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch, max_len, kv_heads, head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.layers))
        return cls(k=zeros, v=zeros, valid_BS=jnp.zeros((batch, max_len), bool),
                   length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.valid_BS.shape[1]

    def with_new_slots(self, valid_BT: jax.Array) -> jax.Array:
        """Returns valid_BS [B, S_max] once T new slots (validity valid_BT [B, T]) are written."""
        return jax.lax.dynamic_update_slice(self.valid_BS, valid_BT.astype(bool), (0, self.length))

    def appended(self, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...],
                 valid_BS: jax.Array, num_new: int) -> "KVCache":
        """Returns the cache holding the updated layers with `num_new` more slots filled."""
        return KVCache(k=tuple(k), v=tuple(v), valid_BS=valid_BS, length=self.length + num_new)

    def dropped_oldest(self, num: int) -> "KVCache":
        """Returns the cache without its `num` (static) oldest slots: slot i + num moves to
        slot i, the last `num` slots are emptied and `length` shrinks by `num` (not below 0).

        Keys were rotated (RoPE) at their absolute positions when written, so the slots that
        stay keep their relative geometry; a sliding window over a long generation.
        """
        def shift(x):  # along the slot axis, 1
            return jnp.concatenate([x[:, num:], jnp.zeros_like(x[:, :num])], axis=1)

        return KVCache(k=tuple(map(shift, self.k)), v=tuple(map(shift, self.v)),
                       valid_BS=shift(self.valid_BS),
                       length=jnp.maximum(self.length - num, 0).astype(jnp.int32))
