"""Jacobi decoding against the `ar` sampler's greedy decoding (its fixed point), on a tiny
random causal transformer and on toy LMs whose guesses converge (and, for rejection
recycling, one whose greedy output is a cycle that a pooled n-gram continues)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from dlm import sampling
from dlm.diffusion.autoregressive import Autoregressive
from dlm.models import build_model, model_config

V = 24
L = 20


@pytest.fixture(scope="module")
def causal():
    config = model_config("micro", "transformer")
    config.update(hidden=32, layers=2, heads=2, kv_heads=2, dropout=0.0)
    model = build_model(config, V)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    network = sampling.from_flax(model, Autoregressive())
    return dataclasses.replace(network, vocab=sampling.Vocab(V - 1, eos_id=0, pad_id=1)), params


def _draw(network, params, name, **options):
    prompt = options.pop("prompt", np.array([2, 3, 4], np.int32))
    tokens, known = options.pop("tokens_BL", None), options.pop("known_BL", None)
    sampler = sampling.get_sampler(name, **options)
    if tokens is not None:
        return sampling.draw(sampler, network, params, jax.random.PRNGKey(0), tokens_BL=tokens,
                             known_BL=known).output
    return sampling.draw(sampler, network, params, jax.random.PRNGKey(0), batch_size=2,
                         length=L, prompt=prompt).output


@pytest.mark.parametrize("window", [1, 3, 8])
def test_jacobi_equals_greedy(causal, window):
    network, params = causal
    greedy = _draw(network, params, "ar", temperature=0.0)
    jacobi = _draw(network, params, "jacobi", window=window)
    np.testing.assert_array_equal(jacobi.tokens_BL, greedy.tokens_BL)
    assert int(jacobi.nfe) <= int(greedy.nfe)
    assert np.asarray(jacobi.token_forwards_B).tolist() == [2 + window * (int(jacobi.nfe) - 1)] * 2
    if window == 1:
        assert int(jacobi.nfe) == int(greedy.nfe)
    # Ending at EOS: the same sample, its tail filled.
    np.testing.assert_array_equal(
        _draw(network, params, "jacobi", window=window, stop_at_eos=True).tokens_BL,
        _draw(network, params, "ar", temperature=0.0, stop_at_eos=True).tokens_BL)


@pytest.mark.parametrize("options", [{"window": 3, "blocks": 2}, {"window": 4, "pool": 3},
                                     pytest.param({"window": 2, "blocks": 2, "pool": 2},
                                                  marks=pytest.mark.slow)])
def test_blocks_and_rejection_recycling_never_change_the_output(causal, options):
    network, params = causal
    greedy = _draw(network, params, "ar", temperature=0.0)
    jacobi = _draw(network, params, "jacobi", **options)
    np.testing.assert_array_equal(jacobi.tokens_BL, greedy.tokens_BL)
    assert int(jacobi.nfe) <= int(greedy.nfe)
    windows = 1 + options.get("pool", 0)
    k = options["window"] * options.get("blocks", 1)
    assert np.asarray(jacobi.token_forwards_B).tolist() == [
        2 + windows * k * (int(jacobi.nfe) - 1)] * 2


def test_rows_with_different_context_equal_each_row_alone(causal):
    network, params = causal
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, V - 1, (3, L)).astype(np.int32)
    known = np.zeros((3, L), bool)
    known[:, :3] = True
    known[0, 10:12] = known[1, 6] = known[2, 15:18] = True  # infilling context per row
    tokens[:, :3] = [2, 3, 4]
    batch = _draw(network, params, "jacobi", window=4, tokens_BL=tokens, known_BL=known)
    greedy = _draw(network, params, "ar", temperature=0.0, tokens_BL=tokens, known_BL=known)
    np.testing.assert_array_equal(batch.tokens_BL, greedy.tokens_BL)
    np.testing.assert_array_equal(np.asarray(batch.tokens_BL)[known], tokens[known])
    for row in range(3):
        alone = _draw(network, params, "jacobi", window=4, tokens_BL=tokens[row:row + 1],
                      known_BL=known[row:row + 1])
        np.testing.assert_array_equal(batch.tokens_BL[row], alone.tokens_BL[0])


@struct.dataclass
class _Cache:
    length: jax.Array


@dataclasses.dataclass(frozen=True)
class _Halving:
    """A toy LM: the next token is the fed one halved, so greedy runs 15, 7, 3, 1, 0, 0, ..."""

    def __call__(self, params, tokens_BT, cache):
        logits = 10.0 * jax.nn.one_hot(tokens_BT // 2, 17)
        return logits, cache.replace(length=cache.length + tokens_BT.shape[1])


@dataclasses.dataclass(frozen=True)
class _InitCache:
    def __call__(self, batch, max_len):
        return _Cache(length=jnp.zeros((), jnp.int32))


def test_converged_guesses_commit_a_whole_window_per_call():
    network = sampling.CausalLM(_Halving(), _InitCache(), sampling.Vocab(mask_id=16))
    prompt = np.array([15], np.int32)
    greedy = sampling.draw(sampling.get_sampler("ar", temperature=0.0), network, {},
                           jax.random.PRNGKey(0), batch_size=1, length=33, prompt=prompt).output
    jacobi = sampling.draw(sampling.get_sampler("jacobi", window=8), network, {},
                           jax.random.PRNGKey(0), batch_size=1, length=33, prompt=prompt).output
    np.testing.assert_array_equal(jacobi.tokens_BL, greedy.tokens_BL)
    assert np.asarray(greedy.tokens_BL[0, :6]).tolist() == [15, 7, 3, 1, 0, 0]
    assert int(greedy.nfe) == 32
    # Once the guesses hold the fixed point (all 0), each call commits the whole window.
    assert int(jacobi.nfe) <= 9


@dataclasses.dataclass(frozen=True)
class _Cycle:
    """A toy LM whose greedy output cycles 1, 2, ..., 5, 1, 2, ...: the next token is
    fed + 1 (after 5: 1); after the mask id (0) or another token it predicts 1."""

    def __call__(self, params, tokens_BT, cache):
        following = jnp.where(tokens_BT == 0, 1, tokens_BT % 5 + 1)
        logits = 10.0 * jax.nn.one_hot(jnp.where(tokens_BT >= 6, 1, following), 7)
        return logits, cache.replace(length=cache.length + tokens_BT.shape[1])


def test_a_recycled_n_gram_that_continues_greedy_commits_a_whole_window():
    network = sampling.CausalLM(_Cycle(), _InitCache(), sampling.Vocab(mask_id=0))
    rule = sampling.get_sampler("jacobi", window=4, pool=2).rule
    tokens_BL = np.zeros((1, 12), np.int32)
    tokens_BL[0, 0] = 1
    known_BL = tokens_BL != 0
    state = sampling.state.SamplerState.start(jnp.asarray(tokens_BL), jnp.asarray(known_BL),
                                              jax.random.PRNGKey(0), 0)
    state = rule.init(network, {}, state, prefix_len=1)
    plain = rule.step(network, {}, state, jax.random.PRNGKey(0))
    assert np.asarray(plain.tokens_BL[0, :3]).tolist() == [1, 2, 0]  # mask guesses: one token
    # A pooled window holding the last committed token (1) followed by greedy's 2, 3, 4: its
    # continuation is verified beside the plain guesses and wins.
    pool_BPK = jnp.asarray([[[1, 2, 3, 4], [9, 9, 9, 9]]], jnp.int32)
    state = state.replace(cache=state.cache.replace(pool_BPK=pool_BPK, newest=jnp.int32(1)))
    recycled = rule.step(network, {}, state, jax.random.PRNGKey(0))
    assert np.asarray(recycled.tokens_BL[0, :6]).tolist() == [1, 2, 3, 4, 5, 0]
    assert int(recycled.nfe) == 1 and int(recycled.token_forwards_B[0]) == 3 * 4
    # The newest pooled window is never recycled (the plain guesses continue it already).
    state = state.replace(cache=state.cache.replace(newest=jnp.int32(0)))
    assert np.asarray(rule.step(network, {}, state, jax.random.PRNGKey(0)).tokens_BL[
        0, :3]).tolist() == [1, 2, 0]


def test_jacobi_options_are_checked():
    with pytest.raises(ValueError, match="temperature=1.0 must be 0"):
        sampling.get_sampler("jacobi", temperature=1.0)
    with pytest.raises(ValueError, match="window=0 must be a positive int"):
        sampling.get_sampler("jacobi", window=0)
    with pytest.raises(ValueError, match="pool=-1 must be an int >= 0"):
        sampling.get_sampler("jacobi", pool=-1)
    with pytest.raises(ValueError, match="blocks=0 must be an int >= 1"):
        sampling.get_sampler("jacobi", blocks=0)
