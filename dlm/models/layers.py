"""Building blocks shared by the DiT denoiser and the causal transformer.

Parameters are float32; `dtype` is the compute dtype of the matmuls. Norms, RoPE, adaLN and
the timestep embedding compute in float32, and the residual stream stays float32.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dlm.models.attention import attend
from dlm.models.masks import MaskSpec

Dtype = Any
# PyTorch's nn.Linear / nn.Embedding default (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
embed_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-1, out_axis=-2)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm (scale, no bias); with `center=False` it is RMSNorm (Llama /
    Qwen2 / LLaDA: no mean subtracted). Returns float32 whatever the input dtype."""

    eps: float = 1e-5
    center: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        if self.center:
            x = x - x.mean(axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(jnp.square(x).mean(axis=-1, keepdims=True) + self.eps) * scale


class RMSNorm(LayerNorm):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * scale."""

    eps: float = 1e-6
    center: bool = False


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}  # `model.norm`


def make_norm(kind: str, eps: float, name: str | None = None) -> nn.Module:
    """The `model.norm` named `kind` with epsilon `eps`."""
    return NORMS[kind](eps=eps, name=name)


def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., K] @ kernel [K, N] with float32 accumulation; returns float32 [..., N].

    Its gradient is written out so that the weight gradient is one dot contracting the
    flattened leading axes of x and of the cotangent, as stored. Autodiff's transpose of the
    same dot asks for the cotangent transposed, and XLA's CPU backend then fuses that
    transpose into the elementwise producer of the cotangent (the GELU's derivative), a
    strided write that cost more than the MLP's matmuls (`experiments.peer_benchmarks`).
    Under `shard_map` both operands are first made varying over the same mesh axes (what
    `jnp.dot` does implicitly), so the replicated kernel's gradient is summed over them.
    """
    axes_x, axes_k = _varying_axes(x), _varying_axes(kernel)
    if axes_x != axes_k:
        x = _vary(x, axes_k - axes_x)
        kernel = _vary(kernel, axes_x - axes_k)
    return _project(x, kernel)


def _varying_axes(a: jax.Array) -> frozenset:
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)
    return manual.varying if manual is not None else frozenset(getattr(aval, "vma", ()))


def _vary(a: jax.Array, axes: frozenset) -> jax.Array:
    return jax.lax.pcast(a, tuple(sorted(axes)), to="varying") if axes else a


@jax.custom_vjp
def _project(x, kernel):
    return jnp.dot(x, kernel, preferred_element_type=jnp.float32)


def _project_fwd(x, kernel):
    return _project(x, kernel), (x, kernel)


def _project_bwd(residuals, g):
    x, kernel = residuals
    dx = jax.lax.dot_general(g.astype(kernel.dtype), kernel, (((g.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    flat_x = x.reshape(-1, x.shape[-1])
    flat_g = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    dkernel = jax.lax.dot_general(flat_x, flat_g, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_project.defvjp(_project_fwd, _project_bwd)


class Dense(nn.Module):
    """Linear layer, bias-free by default: float32 parameters, matmul in `dtype` with float32
    accumulation. Returns [..., features] in `out_dtype` (default `dtype`)."""

    features: int
    dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None
    use_bias: bool = False
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = project(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y.astype(self.out_dtype or self.dtype)


ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic")  # `model.rope_scaling`


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary frequencies: `base` (`model.rope_base`; LLaDA 5e5, Dream/Qwen2 1e6) and an
    optional scaling for contexts past `original_len` positions (`model.rope_scaling`,
    `model.rope_factor` s, `model.rope_original_len` L0), as transformers defines them:

    - 'linear' (position interpolation): every frequency divided by s;
    - 'ntk' (NTK-aware, static): base * s^(D / (D - 2));
    - 'dynamic' (dynamic NTK): for a call whose largest position + 1 is L > L0,
      base * (s L / L0 - (s - 1))^(D / (D - 2)); unchanged while L <= L0. With a KV cache
      each key keeps the frequencies of the call that wrote it (as transformers' cache).

    With s = 1 'linear' and 'ntk' are the unscaled rotation exactly, and 'dynamic' is up to
    L0 positions.
    """

    base: float = 10000.0
    scaling: str = "none"
    factor: float = 1.0
    original_len: int = 0

    def inv_freq(self, head_dim: int, positions) -> np.ndarray | jax.Array:
        """float32 [head_dim / 2]: the rotation frequencies for a call at `positions`.

        A numpy constant (float64 maths, rounded once) unless 'dynamic' scaling has to read
        traced positions; so every call at the same length rotates by the same angles."""
        half = head_dim // 2
        xp = jnp if self.scaling == "dynamic" and not _static(positions) else np
        exponent = xp.arange(half, dtype=xp.float64 if xp is np else xp.float32) / half
        base = self.base
        if self.scaling == "ntk":
            base = base * self.factor ** (head_dim / (head_dim - 2))
        elif self.scaling == "dynamic":
            length = xp.max(positions).astype(exponent.dtype) + 1.0
            grown = self.factor * length / self.original_len - (self.factor - 1.0)
            base = xp.where(length > self.original_len,
                            base * grown ** (head_dim / (head_dim - 2)), base)
        inv_freq = base ** (-exponent)
        if self.scaling == "linear":
            inv_freq = inv_freq / self.factor
        return inv_freq.astype(xp.float32)


def _static(positions) -> bool:
    """Whether `positions` are known at trace time (a numpy array or a Python sequence)."""
    return not isinstance(positions, jax.Array)


def apply_rope(x_BTHD: jax.Array, positions: jax.Array, rope: Rope = Rope()) -> jax.Array:
    """Rotary position embedding (rotate-half convention) on [B, T, H, D], D even.

    `positions` are integer [B, T] or [T]: a jax array, or numpy for positions known at trace
    time (then the cos/sin tables are constants). Angles and rotation are computed in
    float32; returns [B, T, H, D] in x's dtype.
    """
    D = x_BTHD.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {D}")
    half = D // 2
    inv_freq_F = rope.inv_freq(D, positions)
    # Static positions (a full forward) give constant tables (numpy, at trace time). Computed
    # by XLA, cos and sin are fused into the rotation and evaluated once per element of x,
    # H times over and again in the backward, which cost more than the softmax on CPU.
    xp = np if _static(positions) and isinstance(inv_freq_F, np.ndarray) else jnp
    positions = xp.asarray(positions, xp.float32)
    positions = positions.reshape(-1, positions.shape[-1])
    angles_BT1F = (positions[..., None] * inv_freq_F)[:, :, None, :]
    cos, sin = xp.cos(angles_BT1F), xp.sin(angles_BT1F)
    x = x_BTHD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


def modulate(x_BLD: jax.Array, shift_B1D: jax.Array, scale_B1D: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift; returns [B, L, D]."""
    return x_BLD * (1 + scale_B1D) + shift_B1D


class AdaLNModulation(nn.Module):
    """Projects the conditioning vector to `num` modulation vectors, zero-initialised.

    With zero weights and bias every shift, scale and gate starts at 0, so an adaLN-zero block
    starts as the identity. It keeps a bias (as DiT/MDLM) so the modulation is learnable even
    when the conditioning input is constant. Returns `num` float32 arrays [B, 1, features].
    """

    num: int
    features: int

    @nn.compact
    def __call__(self, c_BC: jax.Array) -> tuple[jax.Array, ...]:
        out = Dense(self.num * self.features, jnp.float32, use_bias=True,
                    kernel_init=nn.initializers.zeros)(c_BC)
        return tuple(jnp.split(out[:, None, :], self.num, axis=-1))


class MLP(nn.Module):
    """Dense -> GELU (tanh) -> Dense, bias-free unless `bias` (the public MDLM / BD3-LM DiTs
    have biases); returns [..., hidden] in `dtype`."""

    hidden: int
    intermediate: int
    dtype: Dtype = jnp.float32
    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.intermediate, self.dtype, use_bias=self.bias, name="fc1")(x)
        h = nn.gelu(h, approximate=True)
        return Dense(self.hidden, self.dtype, use_bias=self.bias, name="fc2")(h)


class SwiGLU(nn.Module):
    """Bias-free gated MLP (Llama/Qwen2/LLaDA): down(silu(gate(x)) * up(x)); returns
    [..., hidden] in `dtype`."""

    hidden: int
    intermediate: int
    dtype: Dtype = jnp.float32
    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = Dense(self.intermediate, self.dtype, use_bias=self.bias, name="gate")(x)
        up = Dense(self.intermediate, self.dtype, use_bias=self.bias, name="up")(x)
        return Dense(self.hidden, self.dtype, use_bias=self.bias, name="down")(
            nn.silu(gate) * up)


MLPS = {"gelu": MLP, "swiglu": SwiGLU}  # `model.mlp`


def timestep_sinusoidal(t_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features [cos | sin] of scalar times; returns float32 [B, dim], dim even."""
    half = dim // 2
    freqs_F = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BF = jnp.asarray(t_B, jnp.float32)[:, None] * freqs_F[None]
    return jnp.concatenate([jnp.cos(args_BF), jnp.sin(args_BF)], axis=-1)


class TimestepEmbedding(nn.Module):
    """MLP(sinusoidal(t)) as in DiT/MDLM; returns float32 [B, features]."""

    features: int
    frequency_dim: int = 256

    @nn.compact
    def __call__(self, t_B: jax.Array) -> jax.Array:
        h = timestep_sinusoidal(t_B, self.frequency_dim)
        h = Dense(self.features, jnp.float32, use_bias=True, name="fc1")(h)
        return Dense(self.features, jnp.float32, use_bias=True, name="fc2")(nn.silu(h))


LayerCache = tuple[jax.Array, jax.Array]  # (k_BSKD, v_BSKD) of one layer


def scatter_rows(cache_BS: jax.Array, new_BT: jax.Array, slots_BT: jax.Array,
                 write_BT: jax.Array | None = None) -> jax.Array:
    """cache_BS [B, S, ...] with row b's new_BT[b, t] written at slot slots_BT[b, t] (slots
    distinct per row), in the cache's dtype; where `write_BT` is False the old entry stays."""
    rows_B1 = jnp.arange(cache_BS.shape[0])[:, None]
    new_BT = new_BT.astype(cache_BS.dtype)
    if write_BT is not None:
        old_BT = cache_BS[rows_B1, slots_BT]
        keep = write_BT.reshape(write_BT.shape + (1,) * (new_BT.ndim - 2))
        new_BT = jnp.where(keep, new_BT, old_BT)
    return cache_BS.at[rows_B1, slots_BT].set(new_BT)


class SelfAttention(nn.Module):
    """q/k/v projections (biased when `qkv_bias`, as Qwen2/Dream), RoPE on q and k, `attend`,
    bias-free output projection. Heads are `head_dim` wide (default hidden / heads).

    Without a cache, keys are the T inputs themselves. With `layer_cache` (k, v [B, S, K, Dh]),
    the new keys/values are written at slot `q_offset` (static or traced int) and the queries
    attend over all S slots; `kv_valid_BS` must then mark the filled slots. With `kv_slots_BT`
    (int32 [B, T], distinct per row) they are written at those slots instead, row by row,
    and each query sits at its slot for the mask (a partial forward against a cache indexed
    by position); `write_BT` (bool [B, T], default all) keeps a slot's old key/value where
    False, so a query computed only to fill a static shape leaves the cache as it was.
    Returns (out [B, T, hidden] in `dtype`, updated layer cache or None).
    """

    hidden: int
    heads: int
    kv_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    head_dim: int | None = None
    qkv_bias: bool = False
    rope: Rope = Rope()

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions: jax.Array,
        mask: MaskSpec,
        *,
        q_offset=0,
        kv_valid_BS: jax.Array | None = None,
        layer_cache: LayerCache | None = None,
        kv_slots_BT: jax.Array | None = None,
        write_BT: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        B, T, _ = x_BTD.shape
        head_dim = self.head_dim or self.hidden // self.heads
        bias = self.qkv_bias
        q_BTHD = Dense(self.heads * head_dim, self.dtype, use_bias=bias, name="q")(x_BTD)
        k_BTKD = Dense(self.kv_heads * head_dim, self.dtype, use_bias=bias, name="k")(x_BTD)
        v_BTKD = Dense(self.kv_heads * head_dim, self.dtype, use_bias=bias, name="v")(x_BTD)
        q_BTHD = apply_rope(q_BTHD.reshape(B, T, self.heads, head_dim), positions, self.rope)
        k_BTKD = apply_rope(k_BTKD.reshape(B, T, self.kv_heads, head_dim), positions, self.rope)
        v_BTKD = v_BTKD.reshape(B, T, self.kv_heads, head_dim)

        new_cache = None
        k_BSKD, v_BSKD = k_BTKD, v_BTKD
        if layer_cache is not None and kv_slots_BT is not None:
            k_BSKD, v_BSKD = (scatter_rows(cache, new, kv_slots_BT, write_BT)
                              for cache, new in zip(layer_cache, (k_BTKD, v_BTKD)))
            new_cache = (k_BSKD, v_BSKD)
        elif layer_cache is not None:
            cache_k, cache_v = layer_cache
            start = (0, q_offset, 0, 0)
            k_BSKD = jax.lax.dynamic_update_slice(cache_k, k_BTKD.astype(cache_k.dtype), start)
            v_BSKD = jax.lax.dynamic_update_slice(cache_v, v_BTKD.astype(cache_v.dtype), start)
            new_cache = (k_BSKD, v_BSKD)
        out_BTHD = attend(q_BTHD, k_BSKD.astype(self.dtype), v_BSKD.astype(self.dtype), mask,
                          kv_valid_BS=kv_valid_BS, q_offset=q_offset,
                          q_positions_BT=kv_slots_BT, impl=self.attention_impl)
        out = Dense(self.hidden, self.dtype, name="out")(out_BTHD.reshape(B, T, -1))
        return out, new_cache
