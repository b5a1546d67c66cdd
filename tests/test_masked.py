"""Masked diffusion (MDLM): SUBS, corruption, and the NELBO against exact enumeration.

The key tests use a toy distribution small enough to enumerate (3 real tokens + mask,
length 3) and the EXACT denoiser p(x_0^i | unmasked part of x_t). For it the continuous-time
NELBO equals the data entropy, which `process.nll` must reproduce within Monte-Carlo error;
a context-free denoiser must give the larger cross-entropy of the product of marginals.
"""

import collections
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from dlm.diffusion import masked, process, schedules

NUM_REAL, LENGTH = 3, 3
MASK = NUM_REAL
SEQS = np.array(list(itertools.product(range(NUM_REAL), repeat=LENGTH)))  # [27, L]
STATES = np.array(list(itertools.product(range(NUM_REAL + 1), repeat=LENGTH)))  # [64, L]
SUBSETS = [np.array(bits, bool) for bits in itertools.product([0, 1], repeat=LENGTH)]


def _state_index(xt):
    """Row of STATES holding xt (last axis L); works for numpy and jax int arrays."""
    return sum(xt[..., i] * (NUM_REAL + 1) ** (LENGTH - 1 - i) for i in range(LENGTH))


def _toy_data():
    """A fixed, non-uniform distribution over the 27 sequences, shape [27]."""
    p = np.exp(1.5 * np.random.default_rng(0).normal(size=len(SEQS)))
    return p / p.sum()


def _conditionals(p_data, context_free=False):
    """log p(x^pos = v | unmasked positions of state), [64, L, NUM_REAL], by enumeration.

    context_free=True gives the marginals p(x^pos = v), ignoring the context.
    """
    table = np.zeros((len(STATES), LENGTH, NUM_REAL))
    for s, state in enumerate(STATES):
        seen = state != MASK
        consistent = np.all((state == SEQS) | ~seen, axis=1) | context_free
        for pos in range(LENGTH):
            mass = np.bincount(SEQS[consistent, pos], p_data[consistent], NUM_REAL)
            with np.errstate(divide="ignore"):  # -inf off the observed token; unused
                table[s, pos] = np.log(mass / mass.sum())
    return table


def _model_fn(log_cond):
    """ModelFn returning log_cond as logits, with traps the process must ignore."""
    garbage = np.random.default_rng(1).normal(size=log_cond.shape) * 3
    is_masked = (STATES == MASK)[:, :, None]
    logits = np.where(is_masked, log_cond, garbage)
    # A large mask logit: wrong unless the process gives the mask token zero probability.
    logits = np.concatenate([logits, np.full(logits.shape[:2] + (1,), 5.0)], axis=-1)
    logits = jnp.asarray(logits, jnp.float32)
    return lambda xt_BL, t_B: logits[_state_index(xt_BL)]


def _inner_loss(log_cond, x0, subset):
    """sum over masked pos of -log p(x0^pos | x_t) for x_t = x0 masked on `subset`."""
    state = np.where(subset, MASK, x0)
    return -sum(log_cond[_state_index(state), pos, x0[pos]] for pos in np.flatnonzero(subset))


def _continuous_nelbo(log_cond, alpha, weight, t_lo=0.0, num_nodes=64):
    """Per-sequence mean over t ~ U[t_lo, 1] of the NELBO integrand, [27], by quadrature."""
    nodes, quad_w = np.polynomial.legendre.leggauss(num_nodes)
    t = t_lo + (1 - t_lo) * (nodes + 1) / 2
    quad_w = quad_w / 2
    out = np.zeros(len(SEQS))
    for j, x0 in enumerate(SEQS):
        for subset in SUBSETS:
            k = subset.sum()
            prob_t = (1 - alpha(t)) ** k * alpha(t) ** (LENGTH - k)
            out[j] += np.sum(quad_w * weight(t) * prob_t) * _inner_loss(log_cond, x0, subset)
    return out


def _discrete_nelbo(log_cond, alpha, num_steps):
    """Per-sequence exact T-step NELBO (diffusion terms), [27]."""
    out = np.zeros(len(SEQS))
    for i in range(1, num_steps + 1):
        t, s = i / num_steps, (i - 1) / num_steps
        unmask = (alpha(s) - alpha(t)) / (1 - alpha(t))
        for j, x0 in enumerate(SEQS):
            for subset in SUBSETS:
                k = subset.sum()
                prob_t = (1 - alpha(t)) ** k * alpha(t) ** (LENGTH - k)
                out[j] += prob_t * unmask * _inner_loss(log_cond, x0, subset)
    return out


def _t_step_model(log_cond, alpha, num_steps):
    """Exact distribution [27] of the T-step ancestral sampler started from all masks."""
    dist = {(MASK,) * LENGTH: 1.0}
    for i in range(num_steps, 0, -1):
        t, s = i / num_steps, (i - 1) / num_steps
        stay = (1 - alpha(s)) / (1 - alpha(t))
        new_dist = collections.defaultdict(float)
        for state, prob in dist.items():
            cond = np.exp(log_cond[_state_index(np.array(state))])
            options = [
                [(MASK, stay)] + [(v, (1 - stay) * cond[pos, v]) for v in range(NUM_REAL)]
                if state[pos] == MASK
                else [(state[pos], 1.0)]
                for pos in range(LENGTH)
            ]
            for combo in itertools.product(*options):
                new_dist[tuple(v for v, _ in combo)] += prob * np.prod([q for _, q in combo])
        dist = new_dist
    return np.array([dist.get(tuple(x), 0.0) for x in SEQS])


def _mc_nelbo(diffusion, log_cond, p_data, repeats, seed=0):
    """(estimate, standard error) of E_x NELBO(x) from `process.nll`, each x repeated."""
    # Example b holds sequence b % 27, so each sequence's times spread over all strata.
    tokens = jnp.asarray(np.tile(SEQS, (repeats, 1)), jnp.int32)
    n = tokens.shape[0]
    batch = {
        "tokens": tokens,
        "loss_mask": jnp.ones(tokens.shape, jnp.float32),
        "example_id": jnp.arange(n, dtype=jnp.int32),
    }
    nll = jax.jit(lambda b, rng: diffusion.nll(_model_fn(log_cond), b, rng, num_examples=n))
    nll_sum, count = nll(batch, jax.random.key(seed))
    np.testing.assert_array_equal(count, LENGTH)
    per_seq = np.asarray(nll_sum, np.float64).reshape(repeats, len(SEQS))
    estimate = np.sum(p_data * per_seq.mean(0))
    stderr = np.sqrt(np.sum(p_data**2 * per_seq.var(0) / repeats))
    return estimate, stderr


def _loglinear_np(t):
    return 1 - t


def _cosine_np(t):
    return np.cos(np.pi * t / 2)


def _weight_np(alpha, t, h=1e-6):
    return (alpha(t - h) - alpha(t + h)) / (2 * h) / (1 - alpha(t))


@pytest.fixture(scope="module")
def toy():
    p_data = _toy_data()
    entropy = -np.sum(p_data * np.log(p_data))
    exact = _conditionals(p_data)
    marginal = _conditionals(p_data, context_free=True)
    return p_data, entropy, exact, marginal


def test_reference_continuous_nelbo_is_entropy(toy):
    """Checks the numpy reference itself: tight for the exact denoiser, any schedule."""
    p_data, entropy, exact, marginal = toy
    for alpha in (_loglinear_np, _cosine_np):
        weight = lambda t, alpha=alpha: _weight_np(alpha, t)
        # Tight per sequence: the any-order chain rule of the exact conditionals.
        np.testing.assert_allclose(
            _continuous_nelbo(exact, alpha, weight), -np.log(p_data), rtol=1e-5
        )
        wrong = p_data @ _continuous_nelbo(marginal, alpha, weight)
        cross_entropy = -p_data @ sum(marginal[0, pos, SEQS[:, pos]] for pos in range(LENGTH))
        assert wrong == pytest.approx(cross_entropy, rel=1e-5)
        assert wrong > entropy + 0.2


@pytest.mark.parametrize(
    "schedule, alpha_np, t_min",
    [
        (schedules.LogLinearSchedule(eps=0.0), _loglinear_np, 1e-3),
        (schedules.CosineSchedule(eps=0.0), _cosine_np, 1e-3),
    ],
    ids=["loglinear", "cosine"],
)
def test_continuous_nelbo_matches_enumeration(toy, schedule, alpha_np, t_min):
    p_data, entropy, exact, marginal = toy
    diffusion = masked.MaskedDiffusion(schedule, mask_id=MASK, t_min=t_min)
    weight = lambda t: _weight_np(alpha_np, t)
    for log_cond in (exact, marginal):
        estimate, stderr = _mc_nelbo(diffusion, log_cond, p_data, repeats=3000)
        # Same estimand as the process: t ~ U[t_min, 1].
        reference = p_data @ _continuous_nelbo(log_cond, alpha_np, weight, t_lo=t_min)
        assert stderr < 0.03
        assert abs(estimate - reference) < 4 * stderr, (estimate, reference, stderr)
    # The exact denoiser's bound is the entropy, up to the O(t_min) gap.
    estimate, stderr = _mc_nelbo(diffusion, exact, p_data, repeats=3000, seed=1)
    assert abs(estimate - entropy) < 4 * stderr + 10 * t_min
    wrong, _ = _mc_nelbo(diffusion, marginal, p_data, repeats=3000, seed=1)
    assert wrong > entropy + 0.2


def test_one_step_bound_is_product_of_marginals(toy):
    p_data, _, exact, marginal = toy
    diffusion = masked.MaskedDiffusion(schedules.LogLinearSchedule(eps=0.0), MASK, num_timesteps=1)
    estimate, stderr = _mc_nelbo(diffusion, exact, p_data, repeats=4)
    assert stderr < 1e-6
    one_step_nll = -p_data @ np.log(_t_step_model(exact, _loglinear_np, 1))
    cross_entropy = -p_data @ sum(marginal[0, pos, SEQS[:, pos]] for pos in range(LENGTH))
    assert estimate == pytest.approx(cross_entropy, rel=1e-5)
    assert one_step_nll == pytest.approx(cross_entropy, rel=1e-9)


def test_discrete_nelbo_matches_enumeration(toy):
    p_data, entropy, exact, _ = toy
    num_steps = 4
    diffusion = masked.MaskedDiffusion(
        schedules.LogLinearSchedule(eps=0.0), MASK, num_timesteps=num_steps
    )
    reference_x = _discrete_nelbo(exact, _loglinear_np, num_steps)
    estimate, stderr = _mc_nelbo(diffusion, exact, p_data, repeats=2000)
    assert stderr < 0.02
    assert abs(estimate - p_data @ reference_x) < 4 * stderr
    # Sandwich: entropy <= NLL of the T-step sampler <= its NELBO, per sequence.
    sampler_nll_x = -np.log(_t_step_model(exact, _loglinear_np, num_steps))
    assert np.all(sampler_nll_x <= reference_x + 1e-9)
    assert entropy < p_data @ sampler_nll_x < p_data @ reference_x
    assert p_data @ reference_x > entropy + 0.05


def test_subs_log_probs_invariants():
    diffusion = masked.MaskedDiffusion(schedules.LogLinearSchedule(), mask_id=5)
    rng_logits, rng_xt, rng_mask = jax.random.split(jax.random.key(0), 3)
    logits = 4 * jax.random.normal(rng_logits, (2, 7, 6))
    xt = jax.random.randint(rng_xt, (2, 7), 0, 5)
    xt = jnp.where(jax.random.bernoulli(rng_mask, 0.5, xt.shape), 5, xt)
    log_probs = np.asarray(diffusion.subs_log_probs(logits, xt))
    assert log_probs.dtype == np.float32
    xt, logits = np.asarray(xt), np.asarray(logits, np.float64)
    is_masked = xt == 5
    assert is_masked.any() and (~is_masked).any()
    assert np.all(log_probs[..., 5] == -np.inf)
    real = logits[..., :5] - np.log(np.exp(logits[..., :5]).sum(-1, keepdims=True))
    np.testing.assert_allclose(log_probs[is_masked][:, :5], real[is_masked], rtol=1e-5)
    carry = np.where(np.arange(6) == xt[..., None], 0.0, -np.inf)
    np.testing.assert_array_equal(log_probs[~is_masked], carry[~is_masked])


def test_corruption_rate_matches_schedule():
    schedule = schedules.CosineSchedule()
    diffusion = masked.MaskedDiffusion(schedule, mask_id=9)
    num_examples, length = 64, 4096
    tokens = jax.random.randint(jax.random.key(1), (num_examples, length), 0, 9)
    t = jnp.linspace(0.02, 1.0, num_examples)
    xt = diffusion.corrupt(tokens, t, jax.random.key(2))
    assert xt.dtype == jnp.int32
    is_masked = np.asarray(xt == 9)
    np.testing.assert_array_equal(np.asarray(xt)[~is_masked], np.asarray(tokens)[~is_masked])
    p = np.asarray(1 - schedule.alpha(t), np.float64)
    sigma = np.sqrt(p * (1 - p) / length) + 1e-6
    assert np.all(np.abs(is_masked.mean(1) - p) < 5 * sigma)
    # Per-example randomness: a subset of examples gets the same masks.
    ids = jnp.array([5, 17, 40])
    sub = diffusion.corrupt(tokens[ids], t[ids], jax.random.key(2), ids)
    np.testing.assert_array_equal(sub, xt[ids])


def _random_problem(num_examples=64, length=16, vocab=6, seed=0):
    """A batch with padding (some holding the mask id) and a per-example linear model."""
    k_tok, k_len, k_emb, k_pos = jax.random.split(jax.random.key(seed), 4)
    tokens = jax.random.randint(k_tok, (num_examples, length), 0, vocab - 1)
    lengths = jax.random.randint(k_len, (num_examples, 1), 4, length + 1)
    loss_mask = (jnp.arange(length) < lengths).astype(jnp.float32)
    tokens = jnp.where(loss_mask > 0, tokens, vocab - 1).astype(jnp.int32)
    batch = {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "example_id": jnp.arange(num_examples, dtype=jnp.int32),
    }
    params = {
        "emb": jax.random.normal(k_emb, (vocab, vocab)),
        "pos": jax.random.normal(k_pos, (length, vocab)),
    }

    def apply(params, xt_BL, t_B):
        return params["emb"][xt_BL] + params["pos"] + t_B[:, None, None]

    return batch, params, apply


def test_loss_normalisation_padding_and_grads():
    batch, params, apply = _random_problem()
    diffusion = masked.MaskedDiffusion(schedules.LogLinearSchedule(), mask_id=5)
    rng = jax.random.key(3)

    def loss_fn(params):
        return diffusion.loss(lambda x, t: apply(params, x, t), batch, rng, num_examples=64)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert metrics["token_count"] == batch["loss_mask"].sum()
    assert float(loss) == pytest.approx(
        float(metrics["loss_sum"] / metrics["token_count"]), rel=1e-6
    )
    assert np.isfinite(loss) and loss > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.all(grads["emb"][:, 5] == 0) and np.all(grads["pos"][:, 5] == 0)
    # Padding is ignored: changing what it holds changes nothing.
    other = dict(batch, tokens=jnp.where(batch["loss_mask"] > 0, batch["tokens"], 2))
    nll_a, _ = diffusion.nll(lambda x, t: apply(params, x, t), batch, rng, num_examples=64)
    nll_b, count = diffusion.nll(lambda x, t: apply(params, x, t), other, rng, num_examples=64)
    np.testing.assert_allclose(nll_a, nll_b, rtol=1e-6)
    np.testing.assert_array_equal(count, batch["loss_mask"].sum(1))


@pytest.mark.parametrize("num_timesteps", [0, 8])
def test_loss_identical_across_shards(num_timesteps):
    batch, params, apply = _random_problem()
    diffusion = masked.MaskedDiffusion(
        schedules.LogLinearSchedule(), mask_id=5, num_timesteps=num_timesteps
    )
    model_fn = lambda x, t: apply(params, x, t)
    rng = jax.random.PRNGKey(4)  # a raw key, as the trainer uses
    loss, _ = diffusion.loss(model_fn, batch, rng, num_examples=64)
    nll, _ = diffusion.nll(model_fn, batch, rng, num_examples=64)

    shards = [jax.tree.map(lambda x, i=i: x[i * 8 : (i + 1) * 8], batch) for i in range(8)]
    parts = [diffusion.loss(model_fn, shard, rng, num_examples=64)[1] for shard in shards]
    combined = sum(m["loss_sum"] for m in parts) / sum(m["token_count"] for m in parts)
    assert float(combined) == pytest.approx(float(loss), rel=1e-5)
    shard_nll = [diffusion.nll(model_fn, shard, rng, num_examples=64)[0] for shard in shards]
    np.testing.assert_allclose(np.concatenate(shard_nll), nll, rtol=1e-6)

    def per_device(batch):
        _, metrics = diffusion.loss(model_fn, batch, rng, num_examples=64)
        return jax.lax.psum(metrics["loss_sum"], "data") / jax.lax.psum(
            metrics["token_count"], "data"
        )

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    spec = PartitionSpec("data")
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(spec,), out_specs=PartitionSpec())
    assert float(jax.jit(sharded)(batch)) == pytest.approx(float(loss), rel=1e-5)


def _config(**process_fields):
    return ml_collections.ConfigDict(
        {"process": {"name": "mdlm", **process_fields}, "model": {"vocab_size": 10}}
    )


def test_make_process_mdlm():
    diffusion = process.make_process(_config(schedule="cosine", t_min=1e-2, num_timesteps=16))
    assert diffusion == masked.MaskedDiffusion(
        schedules.CosineSchedule(eps=1e-3), mask_id=9, t_min=1e-2, num_timesteps=16
    )
    assert diffusion.network_kind == "denoiser"
    assert process.make_process(_config(), vocab_size=7).mask_id == 6


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"name": "sedd"}, "process.name"),
        ({"t_min": 0.0}, "process.t_min"),
        ({"num_timesteps": -1}, "process.num_timesteps"),
        ({"schedule": "sqrt"}, "process.schedule"),
    ],
)
def test_make_process_errors_name_the_key(fields, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        process.make_process(_config(**fields))


def test_make_process_needs_vocab_size():
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        process.make_process(ml_collections.ConfigDict({"process": {"name": "mdlm"}}))
