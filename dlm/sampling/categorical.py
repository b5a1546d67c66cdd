"""Drawing tokens: Gumbel-max categorical sampling (float64 where it is cheap) and argmax.

Why float64: with float32 uniforms, u <= 1 - 2**-24, so the Gumbel noise -log(-log u) is
capped near 16.6 and tokens far in the tail are never drawn; MDLM showed that this truncation
lowers sample entropy and flatters generative perplexity. CPUs and GPUs do float64 natively,
TPUs do not, so the default is float64 on cpu/gpu and float32 elsewhere.

JAX without x64 mode silently turns float64 into float32. Turning x64 on globally would change
every default dtype in the library, so the float64 path scopes it with `jax.enable_x64(True)`
around a few primitives. Inside a jit trace that scope is honoured by primitives but NOT by
JAX's own jitted helpers (`jax.random.uniform`, `jnp.argmax`: their float64 versions fail or
truncate in JAX 0.10), so the uniforms are assembled from two uint32 draws here and the argmax
is taken over an equality mask. `tests/test_sampling_categorical.py` checks that the lowered
program really computes in f64.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

GUMBEL_DTYPES = ("float32", "float64")
_FLOAT64_PLATFORMS = ("cpu", "gpu", "cuda", "rocm")


def resolve_dtype(gumbel_dtype: str | None) -> str:
    """'float64' on cpu/gpu and 'float32' elsewhere when `gumbel_dtype` is None."""
    if gumbel_dtype is None:
        return "float64" if jax.default_backend() in _FLOAT64_PLATFORMS else "float32"
    if gumbel_dtype not in GUMBEL_DTYPES:
        raise ValueError(f"gumbel_dtype={gumbel_dtype!r}; allowed: None, "
                         f"{', '.join(GUMBEL_DTYPES)}")
    return gumbel_dtype


def uniform_float64(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float64 uniforms in (0, 1) with 53 random bits, built from two uint32 draws."""
    bits = jax.random.bits(key, (2, *shape), jnp.uint32)
    high = lax.shift_right_logical(bits[0], np.uint32(5))  # 27 bits
    low = lax.shift_right_logical(bits[1], np.uint32(6))  # 26 bits
    with jax.enable_x64(True):
        high = lax.convert_element_type(high, np.float64)
        low = lax.convert_element_type(low, np.float64)
        return (high * 2.0**26 + low + 0.5) * 2.0**-53


def sample_categorical(key: jax.Array, log_probs: jax.Array, gumbel_dtype: str = "float32"
                       ) -> jax.Array:
    """int32 [...]: one draw per row of `log_probs` [..., V] (unnormalised is fine).

    argmax(log_probs + Gumbel noise), the noise in `gumbel_dtype`. Entries at -inf are never
    drawn.
    """
    if resolve_dtype(gumbel_dtype) == "float32":
        u = jax.random.uniform(key, log_probs.shape, jnp.float32,
                               minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
        noisy = log_probs.astype(jnp.float32) - jnp.log(-jnp.log(u))
        return jnp.argmax(noisy, axis=-1).astype(jnp.int32)
    u = uniform_float64(key, log_probs.shape)
    with jax.enable_x64(True):
        noisy = lax.convert_element_type(log_probs, np.float64) - jnp.log(-jnp.log(u))
        is_max = noisy == jnp.max(noisy, axis=-1, keepdims=True)
    return jnp.argmax(is_max, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Categorical:
    """Proposal: a draw from the (transformed) distribution at every position."""

    gumbel_dtype: str | None = None  # None: float64 on cpu/gpu, float32 elsewhere

    def __call__(self, log_probs_BLV: jax.Array, key: jax.Array) -> jax.Array:
        """int32 [B, L] proposed tokens."""
        return sample_categorical(key, log_probs_BLV, resolve_dtype(self.gumbel_dtype))


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Proposal: the most likely token at every position (temperature 0)."""

    def __call__(self, log_probs_BLV: jax.Array, key: jax.Array) -> jax.Array:
        """int32 [B, L] proposed tokens."""
        del key
        return jnp.argmax(log_probs_BLV, axis=-1).astype(jnp.int32)


def proposal_for(temperature: float, gumbel_dtype: str | None = None) -> Categorical | Greedy:
    """Greedy at temperature 0, a categorical draw otherwise."""
    return Greedy() if temperature == 0 else Categorical(gumbel_dtype)
