"""Toy networks whose conditionals come from a known joint over a tiny vocabulary.

For tests: with V real tokens and length L small enough to enumerate V**L sequences, a
sampler that draws one token per step from these conditionals must reproduce the joint
exactly. The params are the log-joint (float32 [V**L]), so it is traced like real weights.
Both networks count their runtime calls through a host callback (`calls`), an NFE count
independent of the sampler's own.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dlm.sampling.networks import CausalLM, Denoiser, Vocab


def all_sequences(vocab_size: int, length: int) -> np.ndarray:
    """int32 [vocab_size**length, length], in lexicographic order."""
    return np.array(list(itertools.product(range(vocab_size), repeat=length)), np.int32)


def random_log_joint(rng: np.random.Generator, vocab_size: int, length: int,
                     sharpness: float = 2.0) -> np.ndarray:
    """float32 [vocab_size**length] log-probabilities of a random, strongly dependent joint."""
    logits = sharpness * rng.standard_normal(vocab_size**length)
    return (logits - np.logaddexp.reduce(logits)).astype(np.float32)


def _conditional_logits(log_joint_K, seqs_KL, fixed_BKL, num_real: int):
    """log p(x_l = v | the fixed positions) [B, L, num_real + 1]; the mask column is -inf."""
    consistent_BK = jnp.all(fixed_BKL, axis=-1)
    weights_BK = jnp.where(consistent_BK, jnp.exp(log_joint_K), 0.0)
    one_hot_KLV = jax.nn.one_hot(seqs_KL, num_real + 1)
    mass_BLV = jnp.einsum("bk,klv->blv", weights_BK, one_hot_KLV)
    return jnp.log(mass_BLV / jnp.sum(weights_BK, axis=-1)[:, None, None])


class JointDenoiser:
    """`apply_fn(log_joint, tokens_BL, t_B) -> logits_BLV`: p(x_l | unmasked positions).

    Hashed by identity; `traces` counts how often JAX traced it, `calls` how often it ran.
    """

    def __init__(self, vocab_size: int, length: int):
        self.vocab_size, self.length = vocab_size, length
        self.mask_id = vocab_size
        self.seqs_KL = all_sequences(vocab_size, length)
        self.traces = 0
        self.calls = 0

    def _count(self):
        self.calls += 1

    def __call__(self, log_joint_K, tokens_BL, t_B):
        del t_B
        self.traces += 1
        jax.debug.callback(self._count)
        tokens_B1L = tokens_BL[:, None, :]
        fixed_BKL = (tokens_B1L == self.seqs_KL[None]) | (tokens_B1L == self.mask_id)
        return _conditional_logits(log_joint_K, self.seqs_KL, fixed_BKL, self.vocab_size)

    def network(self) -> Denoiser:
        return Denoiser(self, Vocab(mask_id=self.mask_id, eos_id=0, pad_id=1))


@struct.dataclass
class PrefixCache:
    """The toy causal LM's 'KV cache': the tokens fed so far."""

    tokens_BL: jax.Array  # int32 [B, max_len]
    length: jax.Array  # int32 []


class JointCausalLM:
    """A causal LM with p(x_{i+1} | x_<=i) from the joint; decode through a PrefixCache."""

    def __init__(self, vocab_size: int, length: int):
        self.vocab_size, self.length = vocab_size, length
        self.mask_id = vocab_size
        self.seqs_KL = all_sequences(vocab_size, length)
        self.calls = 0

    def _count(self):
        self.calls += 1

    def init_cache(self, batch: int, max_len: int) -> PrefixCache:
        return PrefixCache(jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

    def decode(self, log_joint_K, tokens_BT, cache: PrefixCache):
        jax.debug.callback(self._count)
        steps_T = tokens_BT.shape[1]
        tokens_BL = jax.lax.dynamic_update_slice(cache.tokens_BL, tokens_BT, (0, cache.length))
        pos_L = jnp.arange(self.length)
        logits = []
        for t in range(steps_T):
            seen_L = pos_L <= cache.length + t
            agree_BKL = tokens_BL[:, None, :] == self.seqs_KL[None]
            fixed_BKL = agree_BKL | ~seen_L
            next_BV = _conditional_logits(log_joint_K, self.seqs_KL, fixed_BKL, self.vocab_size)
            next_pos = jnp.minimum(cache.length + t + 1, self.length - 1)
            logits.append(jnp.take(next_BV, next_pos, axis=1))
        return jnp.stack(logits, axis=1), PrefixCache(tokens_BL, cache.length + steps_T)

    def network(self) -> CausalLM:
        return CausalLM(self.decode, self.init_cache, Vocab(mask_id=self.mask_id, eos_id=0,
                                                              pad_id=1))


def empirical(tokens_BL: np.ndarray, vocab_size: int) -> np.ndarray:
    """float64 [vocab_size**L]: the frequency of each sequence (lexicographic index)."""
    tokens_BL = np.asarray(tokens_BL, np.int64)
    index_B = np.zeros(tokens_BL.shape[0], np.int64)
    for column in tokens_BL.T:
        index_B = index_B * vocab_size + column
    return np.bincount(index_B, minlength=vocab_size ** tokens_BL.shape[1]) / len(index_B)


def tv_bound(probs_K: np.ndarray, num_samples: int, delta: float = 1e-4) -> float:
    """A bound that the total-variation distance between `probs_K` and the empirical
    distribution of `num_samples` draws from it exceeds with probability < delta.

    E[TV] <= 1/2 sum_k sqrt(p_k (1 - p_k) / n) (Jensen), and TV moves by at most 1/n when one
    draw changes, so McDiarmid adds sqrt(log(1/delta) / (2 n)).
    """
    probs_K = np.asarray(probs_K, np.float64)
    mean = 0.5 * np.sum(np.sqrt(probs_K * (1.0 - probs_K) / num_samples))
    return float(mean + np.sqrt(np.log(1.0 / delta) / (2.0 * num_samples)))


class JointResidualEnergy:
    """The exact EDLM energy of a JointDenoiser: E = -log p(x_0 | x_t) + log p_theta(x_0 | x_t)
    under the joint (params: the log-joint), so p_theta exp(-E) is the joint's conditional.
    +inf for candidates the joint rules out. Hashed by identity."""

    def __init__(self, vocab_size: int, length: int):
        self.vocab_size, self.length = vocab_size, length
        self.seqs_KL = all_sequences(vocab_size, length)

    def __call__(self, log_joint_K, x0_BL, xt_BL, t_B, log_p_BL, mask_id):
        del t_B
        index_B = jnp.zeros(x0_BL.shape[0], jnp.int32)
        for column in range(self.length):
            index_B = index_B * self.vocab_size + x0_BL[:, column]
        fixed_BKL = (xt_BL[:, None, :] == self.seqs_KL[None]) | (xt_BL[:, None, :] == mask_id)
        consistent_BK = jnp.all(fixed_BKL, axis=-1)
        log_norm_B = jax.nn.logsumexp(jnp.where(consistent_BK, log_joint_K, -jnp.inf), axis=-1)
        log_p_joint_B = log_joint_K[index_B] - log_norm_B
        return jnp.sum(log_p_BL, axis=-1) - log_p_joint_B
