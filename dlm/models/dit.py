"""The MDLM denoiser: a diffusion transformer (DiT) with adaLN-zero conditioning and RoPE."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlm.models.kv_cache import KVCache
from dlm.models.layers import (
    MLP,
    AdaLNModulation,
    Dense,
    LayerCache,
    LayerNorm,
    SelfAttention,
    TimestepEmbedding,
    embed_init,
    modulate,
)
from dlm.models.masks import MaskSpec, as_mask_spec


class DiTBlock(nn.Module):
    """Pre-norm block whose shift/scale/gate come from the conditioning vector (adaLN-zero).

    The gates start at zero, so the block starts as the identity. Returns (x [B, T, hidden]
    float32, updated layer cache or None).
    """

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
        c_BC: jax.Array,
        positions: jax.Array,
        mask: MaskSpec,
        *,
        train: bool = False,
        q_offset=0,
        kv_valid_BS: jax.Array | None = None,
        layer_cache: LayerCache | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = AdaLNModulation(
            6, self.hidden, name="adaln")(c_BC)
        h = modulate(LayerNorm(name="norm1")(x_BTD), shift_a, scale_a)
        h, new_cache = SelfAttention(self.hidden, self.heads, self.kv_heads, self.dtype,
                                     self.attention_impl, name="attn")(
            h, positions, mask, q_offset=q_offset, kv_valid_BS=kv_valid_BS,
            layer_cache=layer_cache)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        x_BTD = x_BTD + gate_a * drop(h.astype(jnp.float32))
        h = modulate(LayerNorm(name="norm2")(x_BTD), shift_m, scale_m)
        h = MLP(self.hidden, self.mlp_ratio, self.dtype, name="mlp")(h)
        x_BTD = x_BTD + gate_m * drop(h.astype(jnp.float32))
        return x_BTD, new_cache


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised projection; returns float32 [B, T, vocab]."""

    hidden: int
    vocab_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array, c_BC: jax.Array) -> jax.Array:
        shift, scale = AdaLNModulation(2, self.hidden, name="adaln")(c_BC)
        h = modulate(LayerNorm(name="norm")(x_BTD), shift, scale)
        return Dense(self.vocab_size, self.dtype, out_dtype=jnp.float32,
                     kernel_init=nn.initializers.zeros, name="out")(h)


class DiT(nn.Module):
    """MDLM's denoiser. Returns raw float32 logits; the diffusion process applies SUBS.

    Conditioning: c = silu(MLP(sinusoidal(t))). Without `config.time_conditioning` (the
    default, as MDLM) t is replaced by 0, so c is a learned constant through the same path
    and the parameter tree is the same either way. At init every block is the identity and the
    logits are exactly 0.
    """

    config: Any
    vocab_size: int

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        kv_heads = cfg.get("kv_heads") or cfg.heads
        self.embed = nn.Embed(self.vocab_size, cfg.hidden, embedding_init=embed_init)
        self.time_embed = TimestepEmbedding(cfg.get("cond_dim", 128))
        self.blocks = [
            DiTBlock(cfg.hidden, cfg.heads, kv_heads, cfg.mlp_ratio, cfg.dropout, dtype,
                     cfg.attention_impl)
            for _ in range(cfg.layers)
        ]
        self.final = FinalLayer(cfg.hidden, self.vocab_size, dtype)

    def __call__(
        self,
        tokens_BL: jax.Array,
        t_B: jax.Array | None = None,
        *,
        train: bool = False,
        positions_BL: jax.Array | None = None,
        mask: MaskSpec | str | None = None,
    ) -> jax.Array:
        """Returns logits [B, L, vocab] float32. `t_B` is needed with time conditioning;
        `positions_BL` default to arange(L) (with the bd3lm mask over x_t ⊕ x_0 pass the
        positions of x_t twice); `mask` overrides `config.mask`."""
        L = tokens_BL.shape[1]
        positions = jnp.arange(L) if positions_BL is None else positions_BL
        logits, _ = self._run(tokens_BL, t_B, positions, mask, train=train)
        return logits

    def decode(
        self,
        tokens_BT: jax.Array,
        cache: KVCache,
        t_B: jax.Array | None = None,
        *,
        positions_BT: jax.Array | None = None,
        valid_BT: jax.Array | None = None,
        mask: MaskSpec | str | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs T tokens against a KV cache (for block diffusion: a block over a clean prefix).

        The T tokens' keys/values are written at slot `cache.length`; queries see the cache
        through `mask` with q_offset = cache.length (use e.g. MaskSpec.block_causal(b) with T
        a multiple of b). To score a noisy block without committing it, drop the returned
        cache. Returns (logits [B, T, vocab] float32, cache with T more slots).
        """
        T = tokens_BT.shape[1]
        positions = cache.length + jnp.arange(T) if positions_BT is None else positions_BT
        valid_BT = jnp.ones(tokens_BT.shape, bool) if valid_BT is None else valid_BT
        valid_BS = cache.with_new_slots(valid_BT)
        logits, layers = self._run(tokens_BT, t_B, positions, mask, train=False,
                                   cache=cache, kv_valid_BS=valid_BS)
        k, v = zip(*layers)
        return logits, cache.appended(k, v, valid_BS, T)

    def _run(self, tokens_BT, t_B, positions, mask, *, train, cache=None, kv_valid_BS=None):
        cfg = self.config
        mask = as_mask_spec(cfg.mask if mask is None else mask)
        B = tokens_BT.shape[0]
        if cfg.time_conditioning:
            if t_B is None:
                raise ValueError("model.time_conditioning is True: DiT needs t_B")
        else:
            t_B = jnp.zeros((B,), jnp.float32)
        c_BC = nn.silu(self.time_embed(jnp.broadcast_to(t_B, (B,))))
        x_BTD = self.embed(tokens_BT).astype(jnp.float32)
        q_offset = 0 if cache is None else cache.length
        new_layers = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x_BTD, new_layer = block(x_BTD, c_BC, positions, mask, train=train, q_offset=q_offset,
                                     kv_valid_BS=kv_valid_BS, layer_cache=layer_cache)
            new_layers.append(new_layer)
        return self.final(x_BTD, c_BC), new_layers
