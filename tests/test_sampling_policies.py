"""The small policies on hand-made inputs: Gumbel dtypes, transforms, scores, selection."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import sampling
from dlm.diffusion import CosineSchedule, LogLinearSchedule
from dlm.sampling import categorical, scores, select, times, transforms
from dlm.sampling.networks import Vocab


def test_float64_gumbel_really_computes_in_float64():
    log_probs = jnp.log(jnp.array([[0.6, 0.3, 0.1]] * 4))
    key = jax.random.PRNGKey(0)

    def lowered(dtype):
        return jax.jit(lambda k, lp: categorical.sample_categorical(k, lp, dtype)).lower(
            key, log_probs).as_text()

    assert "f64" in lowered("float64")
    assert "f64" not in lowered("float32")
    assert not jax.config.jax_enable_x64  # the scope did not leak
    assert jnp.zeros(()).dtype == jnp.float32

    u = jax.jit(lambda k: categorical.uniform_float64(k, (10_000,)))(key)
    assert u.dtype == np.float64
    u = np.asarray(u)
    assert u.min() > 0.0 and u.max() < 1.0
    assert np.mean(u != u.astype(np.float32)) > 0.99  # finer than float32 can hold
    assert abs(u.mean() - 0.5) < 0.01


def test_gumbel_dtype_is_automatic_and_overridable():
    assert categorical.resolve_dtype(None) == "float64"  # the tests run on CPU
    assert categorical.resolve_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="gumbel_dtype"):
        categorical.resolve_dtype("bfloat16")
    with pytest.raises(ValueError, match="gumbel_dtype"):
        sampling.get_sampler("mdlm", gumbel_dtype="float16")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_categorical_frequencies(dtype):
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    log_probs = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (40_000, 5))
    draws = np.asarray(categorical.sample_categorical(jax.random.PRNGKey(1), log_probs, dtype))
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.01)
    assert freq[-1] == 0.0


def test_transforms():
    vocab = Vocab(mask_id=4, eos_id=0)
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.3, 0.1, 0.0]]))
    kept = lambda chain: np.isfinite(np.asarray(transforms.log_probs(logits, chain, vocab)[0]))
    np.testing.assert_array_equal(kept(()), [1, 1, 1, 1, 0])  # the mask id never
    np.testing.assert_array_equal(kept((transforms.TopK(2),)), [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(kept((transforms.TopP(0.5),)), [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept((transforms.TopP(0.6),)), [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(kept((transforms.SuppressEos(),)), [0, 1, 1, 1, 0])
    hot = transforms.log_probs(logits, (transforms.Temperature(0.5),), vocab)
    np.testing.assert_allclose(np.exp(hot[0, :4]), np.array([1, 25, 9, 1]) / 36, rtol=1e-5)
    assert transforms.standard(1.0, 0, 1.0) == ()
    with pytest.raises(ValueError, match="top_p"):
        transforms.standard(top_p=0.0)


def test_top_p_keeps_the_nucleus_of_a_sorted_reference():
    logits = np.random.default_rng(0).standard_normal((64, 50)) * 3
    for p in (0.5, 0.9, 0.99):
        kept = np.isfinite(transforms.TopP(p)(jnp.asarray(logits, jnp.float32), Vocab(0)))
        for row, row_kept in zip(logits, np.asarray(kept)):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            size = np.searchsorted(np.cumsum(probs[order]), p) + 1  # smallest prefix >= p
            expected = np.zeros(50, bool)
            expected[order[:size]] = True
            np.testing.assert_array_equal(row_kept, expected)


def test_scores():
    log_probs = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]]))
    tokens = jnp.array([[1, 2]])
    np.testing.assert_allclose(scores.Probability()(log_probs, tokens, None), [[0.2, 0.2]],
                               rtol=1e-6)
    np.testing.assert_allclose(scores.Margin()(log_probs, tokens, None), [[0.5, 0.0]],
                               atol=1e-6)
    entropy = [-sum(p * math.log(p) for p in row) for row in ([.7, .2, .1], [.4, .4, .2])]
    np.testing.assert_allclose(scores.NegEntropy()(log_probs, tokens, None),
                               [[-e for e in entropy]], rtol=1e-5)


def _candidates(scores_BL, eligible_BL=None, step=0, steps=1, reveal=0.0):
    scores_BL = jnp.asarray(scores_BL, jnp.float32)
    batch, length = scores_BL.shape
    eligible_BL = jnp.ones((batch, length), bool) if eligible_BL is None else eligible_BL
    full = lambda value, dtype: jnp.full((batch,), value, dtype)
    return select.Candidates(scores_BL=scores_BL, eligible_BL=jnp.asarray(eligible_BL),
                             step_in_scope_B=full(step, jnp.int32),
                             scope_steps_B=full(steps, jnp.int32),
                             scope_size_B=full(length, jnp.int32),
                             reveal_prob_B=full(reveal, jnp.float32))


def test_linear_count_schedule_is_llada_even_split():
    open_BL = jnp.ones((1, 10), bool)
    counts = []
    for step in range(4):
        commit = select.ScheduledCount()(_candidates(np.zeros((1, 10)), open_BL, step, 4), None)
        counts.append(int(commit.sum()))
        open_BL = open_BL & ~commit
    assert counts == [3, 3, 2, 2]  # LLaDA's base 2 with the remainder 2 first


def test_cosine_count_schedule_ends_with_everything():
    open_BL = jnp.ones((1, 16), bool)
    counts = []
    for step in range(5):
        commit = select.ScheduledCount("cosine")(_candidates(np.zeros((1, 16)), open_BL, step,
                                                            5), None)
        counts.append(int(commit.sum()))
        open_BL = open_BL & ~commit
    assert sum(counts) == 16 and min(counts) >= 1
    assert counts[0] < counts[-1]  # cosine: few first, many last


def test_top_count_ranks_best_first_and_ties_left():
    c = _candidates([[0.1, 0.9, 0.5, 0.9]], [[True, True, True, False]])
    np.testing.assert_array_equal(c.rank_BL(), [[2, 0, 1, 3]])
    commit = select.FixedCount(2)(c, None)
    np.testing.assert_array_equal(commit, [[False, True, True, False]])


def test_threshold_and_factor_rules():
    c = _candidates([[0.95, 0.5, 0.91, 0.2]])
    np.testing.assert_array_equal(select.Threshold(0.9)(c, None), [[1, 0, 1, 0]])
    np.testing.assert_array_equal(select.Threshold(1.0)(c, None), [[1, 0, 0, 0]])  # >= 1
    c = _candidates([[0.8, 0.99, 0.9, 0.1]])
    # sorted c_n = .99, .9, .8, .1: (n + 1)(1 - c_n) = .02, .3, .8, 3.6
    np.testing.assert_array_equal(select.Factor(1.0)(c, None), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(select.Factor(0.5)(c, None), [[0, 1, 1, 0]])
    np.testing.assert_array_equal(select.Factor(0.01)(c, None), [[0, 1, 0, 0]])


def test_reveal_probability():
    key = jax.random.PRNGKey(0)
    eligible = jnp.array([[True] * 1000 + [False] * 10])
    for prob in (0.0, 0.3, 1.0):
        commit = select.Reveal()(_candidates(np.zeros((1, 1010)), eligible, reveal=prob), key)
        assert not np.any(np.asarray(commit)[0, 1000:])
        assert abs(float(commit.sum()) / 1000 - prob) < 0.05


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), CosineSchedule()])
def test_time_at_mask_prob_inverts_the_schedule(schedule):
    t = jnp.linspace(0.001, 1.0, 50)
    np.testing.assert_allclose(times.time_at_mask_prob(schedule, schedule.mask_prob(t)), t,
                               atol=1e-5)


def test_grid_time_reaches_eps_then_zero():
    grid = times.GridTime(eps=1e-5)
    t = jnp.ones((2,))
    next_times = [float(grid.next_time(t, jnp.int32(i), None, None, 4, None)[0])
                  for i in range(5)]
    np.testing.assert_allclose(next_times, [0.75, 0.5, 0.25, 1e-5, 0.0], atol=1e-5)
