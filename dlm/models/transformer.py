"""A causal (autoregressive) transformer built from the same layers, with a KV-cache path."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlm.models.kv_cache import KVCache
from dlm.models.layers import MLP, Dense, LayerCache, LayerNorm, SelfAttention, embed_init
from dlm.models.masks import MaskSpec, as_mask_spec


class TransformerBlock(nn.Module):
    """Pre-norm attention + GELU MLP with residuals; returns (x [B, T, hidden] float32,
    updated layer cache or None)."""

    hidden: int
    heads: int
    kv_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions: jax.Array,
        mask: MaskSpec,
        *,
        train: bool = False,
        q_offset=0,
        kv_valid_BS: jax.Array | None = None,
        layer_cache: LayerCache | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h, new_cache = SelfAttention(self.hidden, self.heads, self.kv_heads, self.dtype,
                                     self.attention_impl, name="attn")(
            LayerNorm(name="norm1")(x_BTD), positions, mask, q_offset=q_offset,
            kv_valid_BS=kv_valid_BS, layer_cache=layer_cache)
        x_BTD = x_BTD + drop(h.astype(jnp.float32))
        h = MLP(self.hidden, self.mlp_ratio, self.dtype, name="mlp")(LayerNorm(name="norm2")(x_BTD))
        x_BTD = x_BTD + drop(h.astype(jnp.float32))
        return x_BTD, new_cache


class Transformer(nn.Module):
    """Causal language model; `config.mask` defaults to causal. Returns float32 logits."""

    config: Any
    vocab_size: int

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        kv_heads = cfg.get("kv_heads") or cfg.heads
        self.embed = nn.Embed(self.vocab_size, cfg.hidden, embedding_init=embed_init)
        self.blocks = [
            TransformerBlock(cfg.hidden, cfg.heads, kv_heads, cfg.mlp_ratio, cfg.dropout, dtype,
                             cfg.attention_impl)
            for _ in range(cfg.layers)
        ]
        self.norm = LayerNorm()
        self.head = Dense(self.vocab_size, dtype, out_dtype=jnp.float32)

    def __call__(
        self,
        tokens_BL: jax.Array,
        *,
        train: bool = False,
        positions_BL: jax.Array | None = None,
        mask: MaskSpec | str | None = None,
    ) -> jax.Array:
        """Returns next-token logits [B, L, vocab] float32 (row i predicts token i + 1)."""
        L = tokens_BL.shape[1]
        positions = jnp.arange(L) if positions_BL is None else positions_BL
        logits, _ = self._run(tokens_BL, positions, mask, train=train)
        return logits

    def decode(
        self,
        tokens_BT: jax.Array,
        cache: KVCache,
        *,
        positions_BT: jax.Array | None = None,
        valid_BT: jax.Array | None = None,
        mask: MaskSpec | str | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Appends T >= 1 tokens (a prompt prefill, one step, or a block) to the cache.

        Queries sit at slots cache.length + arange(T) and see the cache through `mask`
        (default `config.mask`). `positions_BT` (RoPE) default to the slot indices; `valid_BT`
        (default all True) marks padding tokens, which no later query attends to.
        Returns (logits [B, T, vocab] float32, cache with T more slots).
        """
        T = tokens_BT.shape[1]
        positions = cache.length + jnp.arange(T) if positions_BT is None else positions_BT
        valid_BT = jnp.ones(tokens_BT.shape, bool) if valid_BT is None else valid_BT
        valid_BS = cache.with_new_slots(valid_BT)
        logits, layers = self._run(tokens_BT, positions, mask, train=False, cache=cache,
                                   kv_valid_BS=valid_BS)
        k, v = zip(*layers)
        return logits, cache.appended(k, v, valid_BS, T)

    def _run(self, tokens_BT, positions, mask, *, train, cache=None, kv_valid_BS=None):
        mask = as_mask_spec(self.config.mask if mask is None else mask)
        x_BTD = self.embed(tokens_BT).astype(jnp.float32)
        q_offset = 0 if cache is None else cache.length
        new_layers = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x_BTD, new_layer = block(x_BTD, positions, mask, train=train, q_offset=q_offset,
                                     kv_valid_BS=kv_valid_BS, layer_cache=layer_cache)
            new_layers.append(new_layer)
        return self.head(self.norm(x_BTD)), new_layers
