"""Noise schedules against finite differences, and the stratified time sampler."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm.diffusion import schedules

ALL_SCHEDULES = [
    schedules.LogLinearSchedule(eps=1e-3),
    schedules.LogLinearSchedule(eps=0.0),
    schedules.LinearSchedule(eps=1e-3),
    schedules.CosineSchedule(eps=1e-3),
    schedules.CosineSchedule(eps=0.0),
    schedules.PolynomialSchedule(power=2.0, eps=1e-3),
    schedules.PolynomialSchedule(power=0.5, eps=0.0),
]


@pytest.fixture(params=ALL_SCHEDULES, ids=repr)
def schedule(request):
    return request.param


def _alpha64(schedule, t):
    with jax.enable_x64(True):
        return np.asarray(schedule.alpha(jnp.asarray(t, jnp.float64)))


def test_alpha_prime_matches_finite_difference(schedule):
    t = np.linspace(0.05, 0.95, 19)
    h = 1e-5
    fd = (_alpha64(schedule, t + h) - _alpha64(schedule, t - h)) / (2 * h)
    np.testing.assert_allclose(schedule.alpha_prime(jnp.asarray(t, jnp.float32)), fd, rtol=1e-4)


def test_loss_weight_matches_finite_difference(schedule):
    t = np.linspace(0.02, 0.98, 25)
    h = 1e-5
    fd = (_alpha64(schedule, t + h) - _alpha64(schedule, t - h)) / (2 * h)
    expected = -fd / (1.0 - _alpha64(schedule, t))
    weight = schedule.loss_weight(jnp.asarray(t, jnp.float32))
    assert np.all(np.asarray(weight) > 0)
    np.testing.assert_allclose(weight, expected, rtol=1e-4)


def test_mask_prob_is_one_minus_alpha_and_precise_near_zero(schedule):
    t = np.concatenate([np.geomspace(1e-6, 1e-2, 9), np.linspace(0.0, 1.0, 11)])
    expected = 1.0 - _alpha64(schedule, t)
    got = schedule.mask_prob(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)


def test_alpha_endpoints_and_monotone(schedule):
    t = jnp.linspace(0.0, 1.0, 1001)
    alpha = np.asarray(schedule.alpha(t))
    assert alpha[0] == pytest.approx(1.0, abs=1e-7)
    assert alpha[-1] == pytest.approx(schedule.eps, abs=1e-6)
    assert np.all(np.diff(alpha) < 0)


@pytest.mark.parametrize(
    "schedule, formula",
    [
        (schedules.LinearSchedule(eps=1e-3), lambda t: np.exp(np.log(1e-3) * t)),
        (schedules.CosineSchedule(eps=0.01), lambda t: 0.01 + 0.99 * np.cos(np.pi / 2 * t)),
        (schedules.PolynomialSchedule(power=3.0, eps=0.0), lambda t: 1 - t**3),
    ],
    ids=["linear", "cosine", "polynomial"],
)
def test_alpha_formulas(schedule, formula):
    t = np.linspace(0.0, 1.0, 21)
    np.testing.assert_allclose(schedule.alpha(jnp.asarray(t)), formula(t), rtol=1e-5, atol=1e-7)


def test_loglinear_is_mdlm():
    t = jnp.linspace(0.0, 1.0, 11)
    sigma = -np.log1p(-(1 - 1e-3) * np.asarray(t, np.float64))
    alpha = schedules.LogLinearSchedule().alpha(t)
    np.testing.assert_allclose(alpha, np.exp(-sigma), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_examples", [8, 24, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_times_one_per_interval(num_examples, seed):
    rng = jax.random.key(seed)
    ids = jnp.arange(num_examples, dtype=jnp.int32)
    u = np.asarray(schedules.stratified_uniform(rng, ids, num_examples))
    assert np.all((u >= 0) & (u < 1))
    np.testing.assert_array_equal(np.sort(np.floor(u * num_examples)), np.arange(num_examples))

    t_min = 1e-3
    t = np.asarray(schedules.sample_times(rng, ids, num_examples, t_min), np.float64)
    assert np.all((t >= t_min) & (t <= 1))
    bins = np.floor((t - t_min) / (1 - t_min) * num_examples + 1e-4)
    np.testing.assert_array_equal(np.sort(bins), np.arange(num_examples))


def test_stratified_times_identical_in_shards():
    num_examples, num_shards = 64, 8
    rng = jax.random.key(7)
    ids = jnp.arange(num_examples, dtype=jnp.int32)
    whole = schedules.sample_times(rng, ids, num_examples, 1e-3)
    shards = [
        schedules.sample_times(rng, shard, num_examples, 1e-3)
        for shard in jnp.split(ids, num_shards)
    ]
    np.testing.assert_array_equal(np.concatenate(shards), whole)
    # Not the same times for every rng.
    other = schedules.sample_times(jax.random.key(8), ids, num_examples, 1e-3)
    assert not np.allclose(whole, other)


def test_grid_times_balanced():
    num_steps, num_examples = 4, 32
    ids = jnp.arange(num_examples, dtype=jnp.int32)
    t = np.asarray(schedules.sample_grid_times(jax.random.key(3), ids, num_examples, num_steps))
    steps, counts = np.unique(np.round(t * num_steps).astype(int), return_counts=True)
    np.testing.assert_array_equal(steps, [1, 2, 3, 4])
    np.testing.assert_array_equal(counts, [8, 8, 8, 8])
    np.testing.assert_allclose(t * num_steps, np.round(t * num_steps), atol=1e-6)


def _config(**process):
    return ml_collections.ConfigDict({"process": process})


def test_make_schedule_builds_each():
    assert schedules.make_schedule(_config()) == schedules.LogLinearSchedule(eps=1e-3)
    assert schedules.make_schedule(_config(schedule="cosine", schedule_eps=0.0)) == (
        schedules.CosineSchedule(eps=0.0)
    )
    assert schedules.make_schedule(_config(schedule="linear")) == schedules.LinearSchedule()
    poly = schedules.make_schedule(_config(schedule="polynomial", schedule_power=3.0))
    assert poly == schedules.PolynomialSchedule(power=3.0, eps=1e-3)


@pytest.mark.parametrize(
    "process, key",
    [
        ({"schedule": "geometric"}, "process.schedule"),
        ({"schedule_eps": 1.0}, "process.schedule_eps"),
        ({"schedule": "linear", "schedule_eps": 0.0}, "process.schedule_eps"),
        ({"schedule": "polynomial", "schedule_power": 0.0}, "process.schedule_power"),
    ],
)
def test_make_schedule_errors_name_the_key(process, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        schedules.make_schedule(_config(**process))
