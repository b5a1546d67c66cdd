"""Approximate KV caches for bidirectional denoisers: which positions to recompute each step.

A bidirectional denoiser recomputes every position at every step, yet the keys/values of
most positions barely change between steps. A *reuse policy* keeps a cache of every
position's keys/values per layer (slot s holds position s) and says, at each step of
semi-autoregressive block decoding (`Unmask` with `block_length`), which positions the
network recomputes; all other keys/values come from the cache. One mechanism serves every
published policy:

- a full **refresh** of a row (all L positions recomputed and written, which is the plain
  forward and rebuilds its cache) whenever the row's active block changes, and every
  `every` steps since its last refresh (0: only at block starts);
- otherwise only the positions the policy *needs* (`need_BL`) are recomputed, their fresh
  keys/values written into the cache, and every other key/value read from it.

Both are one partial call (`Denoiser.partial_fn`) over a static-size query set gathered per
row: the update window first (the active block's `block_length` positions, whose logits
the commit rule reads), then the needs, then fill. Its size is L when a row refreshes, else
the smallest of the policy's static `sizes` that holds every row's needs (`lax.switch`,
each size traced once); positions gathered only to fill it are computed but not written,
so a row's result does not depend on the rest of its batch, and each row is charged (in
`token_forwards_B`) what it costs alone.

Policies (each a frozen dataclass; `by_name` builds them from a sampler's `cache` option):

- `Prefix` (Fast-dLLM prefix cache): recompute the active block and everything after it;
  the prefix (prompt and committed blocks) is cached at the block's start.
- `Dual` (Fast-dLLM dual cache): recompute the active block only; the suffix of later,
  still-masked blocks is cached too.
- `DKV` (dKV-Cache): variant 'decode' recomputes every still-masked position and, once,
  each position committed at the previous step (delayed caching: a decoded token's
  keys/values enter the cache one step after it is decoded, computed with the token itself
  as input); variant 'greedy' caches a token as soon as it is decoded and recomputes only
  the masked positions of the active block and the `vicinity` positions after it.
- `FreeCache`: reuse the keys/values of clean positions (prompt and committed tokens, cached
  as they are decoded) and recompute every masked one, refreshed on the `every` schedule.
- `Vicinity` (dInfer's vicinity refresh): recompute the active block and `vicinity`
  positions on each side of it; the rest is cached at block starts.

Every policy composes with every commit rule of `Unmask` (threshold, factor, fixed counts,
confidence orders, the time plans), since it only replaces where the logits come from.
The partial call runs the attention reference (`attend` with per-query positions), not the
Pallas kernel: its queries are gathered, not a contiguous run at one offset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from dlm.sampling.state import SamplerState


@dataclasses.dataclass(frozen=True)
class Scope:
    """What a policy sees at one step (arrays per row)."""

    open_BL: jax.Array  # bool [B, L]: positions still masked
    committed_last_BL: jax.Array  # bool [B, L]: committed at the previous step
    block_start_B: jax.Array  # int32 [B]: the active block's first position
    window_BL: jax.Array  # bool [B, L]: the update window (the active block, or the last W)
    window: int  # its size, the sampler's block_length (static)


@struct.dataclass
class ReuseCarry:
    """What a reuse policy carries in `SamplerState.cache`."""

    kv: Any  # the network's cache of every position (`KVCache` with L slots)
    block_B: jax.Array  # int32 [B]: the active block at the row's last refresh (-1: none)
    refreshed_B: jax.Array  # int32 [B]: the step of the row's last refresh


def doubling_sizes(window: int, length: int) -> tuple[int, ...]:
    """window, 2 window, 4 window, ... below length, then length: the query-set sizes of a
    policy whose needs grow up to the whole sequence."""
    sizes, size = [], window
    while size < length:
        sizes.append(size)
        size *= 2
    return (*sizes, length)


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Fast-dLLM's prefix cache: the active block and everything after it are recomputed."""

    every: int = 0

    def sizes(self, window: int, length: int) -> tuple[int, ...]:
        return doubling_sizes(window, length)

    def need_BL(self, scope: Scope) -> jax.Array:
        positions_L = jnp.arange(scope.open_BL.shape[1])
        return positions_L >= scope.block_start_B[:, None]


@dataclasses.dataclass(frozen=True)
class Dual:
    """Fast-dLLM's dual cache: only the active block is recomputed."""

    every: int = 0

    def sizes(self, window: int, length: int) -> tuple[int, ...]:
        return (window,)

    def need_BL(self, scope: Scope) -> jax.Array:
        return scope.window_BL


DKV_VARIANTS = ("decode", "greedy")


@dataclasses.dataclass(frozen=True)
class DKV:
    """dKV-Cache: 'decode' (delayed caching, every masked position recomputed) or 'greedy'
    (immediate caching, the masked positions of the active block and `vicinity` after it)."""

    every: int = 4
    variant: str = "decode"
    vicinity: int = 0

    def __post_init__(self):
        if self.variant not in DKV_VARIANTS:
            raise ValueError(f"dKV-Cache variant {self.variant!r}; allowed: "
                             f"{', '.join(DKV_VARIANTS)}")

    def sizes(self, window: int, length: int) -> tuple[int, ...]:
        if self.variant == "greedy":
            return (min(window + self.vicinity, length),)
        return doubling_sizes(window, length)

    def need_BL(self, scope: Scope) -> jax.Array:
        if self.variant == "decode":
            return scope.open_BL | scope.committed_last_BL
        positions_L = jnp.arange(scope.open_BL.shape[1])
        start_B1 = scope.block_start_B[:, None]
        near_BL = (positions_L >= start_B1) & (positions_L < start_B1 + scope.window
                                               + self.vicinity)
        return scope.open_BL & near_BL


@dataclasses.dataclass(frozen=True)
class FreeCache:
    """FreeCache: clean positions' keys/values are reused, every masked one is recomputed."""

    every: int = 4

    def sizes(self, window: int, length: int) -> tuple[int, ...]:
        return doubling_sizes(window, length)

    def need_BL(self, scope: Scope) -> jax.Array:
        return scope.open_BL


@dataclasses.dataclass(frozen=True)
class Vicinity:
    """dInfer's vicinity refresh: the active block and `vicinity` positions on each side."""

    every: int = 0
    vicinity: int = 4

    def sizes(self, window: int, length: int) -> tuple[int, ...]:
        return (min(window + 2 * self.vicinity, length),)

    def need_BL(self, scope: Scope) -> jax.Array:
        positions_L = jnp.arange(scope.open_BL.shape[1])
        start_B1 = scope.block_start_B[:, None]
        return ((positions_L >= start_B1 - self.vicinity)
                & (positions_L < start_B1 + scope.window + self.vicinity))


POLICIES = {"prefix": Prefix, "dual": Dual, "dkv": DKV, "freecache": FreeCache,
            "dinfer": Vicinity}
CACHES = ("none", *POLICIES)  # a block-decoding sampler's `cache` option


def by_name(cache: str, every: int | None = None, vicinity: int | None = None,
            variant: str | None = None):
    """The reuse policy of a sampler's `cache` option (None for 'none'), with `every` (its
    refresh interval; None: the policy's default), `vicinity` and the dKV `variant` where the
    policy takes them. Raises ValueError naming the option for a bad value."""
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}; allowed: {', '.join(CACHES)}")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool)
                              or every < 0):
        raise ValueError(f"cache_every={every!r} must be an int >= 0 (0: refresh at block "
                         "starts only)")
    if vicinity is not None and (not isinstance(vicinity, int) or vicinity < 0):
        raise ValueError(f"cache_vicinity={vicinity!r} must be an int >= 0")
    if cache == "none":
        return None
    cls = POLICIES[cache]
    fields = {f.name for f in dataclasses.fields(cls)}
    options = {"every": every, "vicinity": vicinity, "variant": variant}
    return cls(**{k: v for k, v in options.items() if v is not None and k in fields})


def init(network, batch: int, length: int) -> ReuseCarry:
    """The carry before the first step: an empty cache, so every row refreshes first.
    Raises ValueError for a network without a partial forward."""
    if getattr(network, "partial_fn", None) is None:
        raise ValueError("this network has no partial forward (Denoiser.partial_fn), so it "
                         "cannot decode with an approximate KV cache (the `cache` option); "
                         "Dream-style shifted logits (model.shift_logits) have none")
    minus_one = jnp.full((batch,), -1, jnp.int32)
    return ReuseCarry(kv=network.init_cache_fn(batch, length), block_B=minus_one,
                      refreshed_B=minus_one)


def cached_logits(policy, network, params, state: SamplerState, blocks, window: int,
                  mask_id: int) -> tuple[jax.Array, SamplerState]:
    """The logits [B, window, V] of each row's update window (`blocks`, an `unmask.Blocks`:
    window_start_B + arange(window)) and the state with the carry, nfe and token forwards
    updated.

    One partial call serves every row: its query set holds, per row, the update window
    first, then the positions the policy needs, then fill; a row that refreshes writes all
    L positions (a query set of all L positions rewrites every layer's cache before any
    query reads it: the plain forward), the others write only their needs. Its size is L
    when any row refreshes, else the smallest of the policy's sizes holding every row's
    needs. Each row is charged what it would cost alone: L for a refresh, else the size
    that holds its own needs.
    """
    carry: ReuseCarry = state.cache
    batch, length = state.tokens_BL.shape
    positions_L = jnp.arange(length, dtype=jnp.int32)
    start_B1 = blocks.window_start_B[:, None]
    window_BL = (positions_L >= start_B1) & (positions_L < start_B1 + window)
    running_B = ~state.done_B
    refresh_B = blocks.active_B != carry.block_B
    if policy.every:
        refresh_B |= state.step - carry.refreshed_B >= policy.every
    refresh_B &= running_B

    committed_last_BL = (state.commit_step_BL == state.step - 1) & (state.commit_step_BL >= 0)
    scope = Scope(open_BL=state.open_BL(mask_id), committed_last_BL=committed_last_BL,
                  block_start_B=blocks.active_start_B, window_BL=window_BL, window=window)
    need_BL = policy.need_BL(scope) | window_BL
    write_BL = need_BL | refresh_B[:, None]
    sizes = tuple(sorted({*policy.sizes(window, length), length}))
    sizes_S = jnp.asarray(sizes, jnp.int32)
    count_B = jnp.sum(write_BL, axis=-1, dtype=jnp.int32)
    own_branch_B = jnp.sum(count_B[:, None] > sizes_S[None, :-1], axis=-1)
    branch = jnp.max(jnp.where(running_B, own_branch_B, 0)).astype(jnp.int32)
    # The query set: the update window first (in order), then the other needs, then fill.
    priority_BL = jnp.where(window_BL, 0, jnp.where(need_BL, 1, 2)) * length + positions_L
    order_BL = jnp.argsort(priority_BL, axis=-1).astype(jnp.int32)

    def partial(size):
        def call():
            idx_BN = order_BL[:, :size]
            tokens_BN = jnp.take_along_axis(state.tokens_BL, idx_BN, axis=1)
            write_BN = jnp.take_along_axis(write_BL, idx_BN, axis=1)
            logits_BNV, kv = network.partial_fn(params, tokens_BN, idx_BN, carry.kv, state.t_B,
                                                write_BN)
            return logits_BNV[:, :window].astype(jnp.float32), kv
        return call

    logits_BWV, kv = lax.switch(branch, [partial(size) for size in sizes])
    state = state.called(sizes_S[own_branch_B])
    carry = ReuseCarry(kv=kv, block_B=jnp.where(refresh_B, blocks.active_B, carry.block_B),
                       refreshed_B=jnp.where(refresh_B, state.step, carry.refreshed_B))
    return logits_BWV, state.replace(cache=carry)
