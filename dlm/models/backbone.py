"""The transformer stack shared by the MDLM denoiser (DiT) and the causal model.

Both are embeddings, N pre-norm blocks (RoPE attention through `attend`, an MLP) and an
output head; they differ in one switch. A *conditioned* stack (the DiT) modulates every
norm with shift/scale/gate from a conditioning vector (adaLN-zero: the gates start at 0,
so each block starts as the identity) and ends in an adaLN final layer whose projection
starts at 0; an unconditioned stack (the causal transformer) has plain pre-norm residual
blocks and a plain head. The attention mask is data (`config.mask`), so the same stack
serves full, causal and block masks, and `decode` runs a block of tokens against a KV cache.

The options of the pretrained families (Llama, Qwen2, LLaDA, Dream) are config keys whose
defaults are dlm's own networks: `model.norm` ('layernorm' | 'rmsnorm') and `norm_eps`;
`model.mlp` ('gelu' | 'swiglu') of width `mlp_hidden` (0: mlp_ratio * hidden); `qkv_bias`;
`mlp_bias` and `head_bias` (the public MDLM and BD3-LM DiTs' MLP and output biases);
`head_dim` (0: hidden / heads); `rope_base` and `rope_scaling` / `rope_factor` /
`rope_original_len` (`layers.Rope`); `tie_embeddings` (the head is the embedding matrix);
and `shift_logits` (Dream: position i's logits predict token i + 1 and are shifted right
by one, so every sampler reads position i's prediction of token i, as for any denoiser).
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dlm.models.kv_cache import KVCache
from dlm.models.layers import (
    MLPS,
    AdaLNModulation,
    Dense,
    LayerCache,
    Rope,
    SelfAttention,
    TimestepEmbedding,
    embed_init,
    make_norm,
    modulate,
    scatter_rows,
)
from dlm.models.masks import MaskSpec, as_mask_spec


@dataclasses.dataclass(frozen=True)
class Arch:
    """The per-block options of `model.*` (see the module docstring), resolved."""

    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    mlp_hidden: int = 0
    mlp_bias: bool = False
    head_bias: bool = False
    head_dim: int = 0
    qkv_bias: bool = False
    rope: Rope = Rope()

    @classmethod
    def of(cls, cfg) -> "Arch":
        """From a model config; keys a run saved before they existed take their defaults."""
        get = cfg.get
        return cls(norm=get("norm", "layernorm"), norm_eps=float(get("norm_eps", 1e-5)),
                   mlp=get("mlp", "gelu"),
                   mlp_hidden=get("mlp_hidden", 0) or cfg.mlp_ratio * cfg.hidden,
                   mlp_bias=bool(get("mlp_bias", False)),
                   head_bias=bool(get("head_bias", False)),
                   head_dim=get("head_dim", 0) or cfg.hidden // cfg.heads,
                   qkv_bias=bool(get("qkv_bias", False)),
                   rope=Rope(base=float(get("rope_base", 10000.0)),
                             scaling=get("rope_scaling", "none"),
                             factor=float(get("rope_factor", 1.0)),
                             original_len=get("rope_original_len", 0) or get("max_len", 0)))


class Block(nn.Module):
    """Pre-norm attention + MLP with residuals, adaLN-modulated when `conditioned`.

    Returns (x [B, T, hidden] float32, updated layer cache or None).
    """

    hidden: int
    heads: int
    kv_heads: int
    arch: Arch = Arch()
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    conditioned: bool = False

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        c_BC: jax.Array | None,
        positions: jax.Array,
        mask: MaskSpec,
        *,
        train: bool = False,
        q_offset=0,
        kv_valid_BS: jax.Array | None = None,
        layer_cache: LayerCache | None = None,
        kv_slots_BT: jax.Array | None = None,
        write_BT: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        if self.conditioned:
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = AdaLNModulation(
                6, self.hidden, name="adaln")(c_BC)
        else:
            shift_a = scale_a = shift_m = scale_m = None
            gate_a = gate_m = 1.0
        drop = nn.Dropout(self.dropout, deterministic=not train)

        arch = self.arch
        h = _maybe_modulate(make_norm(arch.norm, arch.norm_eps, "norm1")(x_BTD), shift_a, scale_a)
        h, new_cache = SelfAttention(self.hidden, self.heads, self.kv_heads, self.dtype,
                                     self.attention_impl, arch.head_dim, arch.qkv_bias,
                                     arch.rope, name="attn")(
            h, positions, mask, q_offset=q_offset, kv_valid_BS=kv_valid_BS,
            layer_cache=layer_cache, kv_slots_BT=kv_slots_BT, write_BT=write_BT)
        x_BTD = x_BTD + gate_a * drop(h.astype(jnp.float32))
        h = _maybe_modulate(make_norm(arch.norm, arch.norm_eps, "norm2")(x_BTD), shift_m, scale_m)
        h = MLPS[arch.mlp](self.hidden, arch.mlp_hidden, self.dtype, arch.mlp_bias,
                           name="mlp")(h)
        x_BTD = x_BTD + gate_m * drop(h.astype(jnp.float32))
        return x_BTD, new_cache


def _maybe_modulate(x, shift, scale):
    return x if shift is None else modulate(x, shift, scale)


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised projection; returns float32 [B, T, vocab]."""

    hidden: int
    vocab_size: int
    dtype: Any = jnp.float32
    arch: Arch = Arch()

    @nn.compact
    def __call__(self, x_BTD: jax.Array, c_BC: jax.Array) -> jax.Array:
        shift, scale = AdaLNModulation(2, self.hidden, name="adaln")(c_BC)
        h = modulate(make_norm(self.arch.norm, self.arch.norm_eps, "norm")(x_BTD), shift, scale)
        return Dense(self.vocab_size, self.dtype, out_dtype=jnp.float32,
                     use_bias=self.arch.head_bias, kernel_init=nn.initializers.zeros,
                     name="out")(h)


class Backbone(nn.Module):
    """Token embedding, `config.layers` blocks and a head; subclasses set `conditioned`."""

    config: Any
    vocab_size: int

    conditioned: ClassVar[bool] = False

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        kv_heads = cfg.get("kv_heads") or cfg.heads
        arch = Arch.of(cfg)
        self.tied = bool(cfg.get("tie_embeddings", False))
        self.shift = bool(cfg.get("shift_logits", False))
        self.embed = nn.Embed(self.vocab_size, cfg.hidden, embedding_init=embed_init)
        self.blocks = [
            Block(cfg.hidden, cfg.heads, kv_heads, arch, cfg.dropout, dtype,
                  cfg.attention_impl, conditioned=self.conditioned)
            for _ in range(cfg.layers)
        ]
        if self.conditioned:
            self.time_embed = TimestepEmbedding(cfg.get("cond_dim", 128))
            self.final = FinalLayer(cfg.hidden, self.vocab_size, dtype, arch)
        else:
            self.norm = make_norm(arch.norm, arch.norm_eps)
            if not self.tied:
                self.head = Dense(self.vocab_size, dtype, out_dtype=jnp.float32,
                                  use_bias=arch.head_bias)

    def __call__(
        self,
        tokens_BL: jax.Array,
        t_B: jax.Array | None = None,
        *,
        train: bool = False,
        positions_BL: jax.Array | None = None,
        mask: MaskSpec | str | None = None,
        output_len: int | None = None,
        kv_valid_BL: jax.Array | None = None,
    ) -> jax.Array:
        """Returns logits [B, output_len or L, vocab] float32.

        `t_B` (diffusion time) is read only by a time-conditioned DiT; `positions_BL` (RoPE)
        default to arange(L) (with the bd3lm mask over x_t ⊕ x_0 pass the positions of x_t
        twice); `mask` overrides `config.mask`; `output_len` keeps only the first positions'
        logits (the x_t half of x_t ⊕ x_0), so the head never runs on the others;
        `kv_valid_BL` (bool [B, L], optional) marks the keys queries may attend to (False:
        padding, never attended).
        """
        L = tokens_BL.shape[1]
        # Static (numpy) positions make RoPE's tables constants (`layers.apply_rope`).
        positions = np.arange(L) if positions_BL is None else positions_BL
        logits, _ = self._run(tokens_BL, t_B, positions, mask, train=train,
                              output_len=output_len, kv_valid_BS=kv_valid_BL)
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
        """Runs T >= 1 tokens (a prompt prefill, one step, or a block) against a KV cache.

        The tokens' keys/values are written at slots cache.length + arange(T); queries see the
        cache through `mask` (default `config.mask`) with q_offset = cache.length (for block
        masks T must be a multiple of the block size). `positions_BT` (RoPE) default to the
        slot indices; `valid_BT` (default all True) marks padding that no later query attends
        to. To score a block without keeping it (block diffusion), drop the returned cache.
        Returns (logits [B, T, vocab] float32, the cache with T more slots).
        """
        if self.shift:
            raise ValueError("model.shift_logits: KV-cache decoding of a network whose logits "
                             "are shifted (Dream) needs the hidden state before each block; "
                             "decode it without a cache")
        T = tokens_BT.shape[1]
        positions = cache.length + jnp.arange(T) if positions_BT is None else positions_BT
        valid_BT = jnp.ones(tokens_BT.shape, bool) if valid_BT is None else valid_BT
        valid_BS = cache.with_new_slots(valid_BT)
        logits, layers = self._run(tokens_BT, t_B, positions, mask, train=False, cache=cache,
                                   kv_valid_BS=valid_BS)
        k, v = zip(*layers)
        return logits, cache.appended(k, v, valid_BS, T)

    def partial(
        self,
        tokens_BN: jax.Array,
        cache: KVCache,
        positions_BN: jax.Array,
        t_B: jax.Array | None = None,
        *,
        valid_BN: jax.Array | None = None,
        write_BN: jax.Array | None = None,
        mask: MaskSpec | str | None = None,
        slots_BN: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs N tokens gathered from a sequence of S = cache.max_len positions against a
        cache whose slot s holds position s (an approximate KV cache of a bidirectional
        denoiser, `dlm.sampling.kv_reuse`), or, with `slots_BN`, the slot of each token
        (Fast-dLLM v2's sub-blocks against a block diffusion cache, whose slots trail the
        positions once its sliding window has dropped blocks).

        `positions_BN` (int32, distinct per row) are the tokens' absolute positions: RoPE
        rotates them there, their keys/values are written at those slots, and each query sees
        the S slots through `mask` (default `config.mask`) from its slot; `valid_BN`
        (default all True) marks padding, never attended; `write_BN` (default all True) keeps
        the cached key/value of a position computed only to fill the static shape, so it
        does not change the cache. Over all S positions on an empty cache this is the plain
        forward, and returns the cache of every position. Returns (logits [B, N, vocab]
        float32, the cache with the written slots; its length is unchanged).
        """
        if self.shift:
            raise ValueError("model.shift_logits: a partial forward of a network whose logits "
                             "are shifted (Dream) needs the hidden state of the position "
                             "before each query; decode it without a cache")
        valid_BN = jnp.ones(tokens_BN.shape, bool) if valid_BN is None else valid_BN.astype(bool)
        slots_BN = positions_BN if slots_BN is None else slots_BN
        valid_BS = scatter_rows(cache.valid_BS, valid_BN, slots_BN, write_BN)
        logits, layers = self._run(tokens_BN, t_B, positions_BN, mask, train=False, cache=cache,
                                   kv_valid_BS=valid_BS, kv_slots_BT=slots_BN,
                                   write_BT=write_BN)
        k, v = zip(*layers)
        return logits, cache.appended(k, v, valid_BS, 0)

    def _condition(self, t_B: jax.Array | None, batch: int) -> jax.Array | None:
        """The conditioning vector c [B, cond_dim] of a conditioned stack, else None."""
        if not self.conditioned:
            return None
        if self.config.time_conditioning:
            if t_B is None:
                raise ValueError("model.time_conditioning is True: the DiT needs t_B")
        else:
            t_B = jnp.zeros((batch,), jnp.float32)
        return nn.silu(self.time_embed(jnp.broadcast_to(t_B, (batch,))))

    def _run(self, tokens_BT, t_B, positions, mask, *, train, cache=None, kv_valid_BS=None,
             output_len=None, kv_slots_BT=None, write_BT=None):
        mask = as_mask_spec(self.config.mask if mask is None else mask)
        c_BC = self._condition(t_B, tokens_BT.shape[0])
        x_BTD = self.embed(tokens_BT).astype(jnp.float32)
        q_offset = 0 if cache is None else cache.length
        new_layers = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x_BTD, new_layer = block(x_BTD, c_BC, positions, mask, train=train,
                                     q_offset=q_offset, kv_valid_BS=kv_valid_BS,
                                     layer_cache=layer_cache, kv_slots_BT=kv_slots_BT,
                                     write_BT=write_BT)
            new_layers.append(new_layer)
        x_BTD = x_BTD if output_len is None else x_BTD[:, :output_len]
        if self.conditioned:
            logits = self.final(x_BTD, c_BC)
        elif self.tied:
            dtype = jnp.dtype(self.config.dtype)
            logits = jnp.dot(self.norm(x_BTD).astype(dtype), self.embed.embedding.T.astype(dtype),
                             preferred_element_type=jnp.float32)
        else:
            logits = self.head(self.norm(x_BTD))
        if self.shift:  # position i's logits predict token i + 1: read them at i + 1
            logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
        return logits, new_layers
