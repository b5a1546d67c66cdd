"""EDLM: importance sampling under an exact energy on a toy joint (closed form), k = 1 and
out-of-window steps equal to MDLM's sampler, the AR energy against a prefix-by-prefix
reference, NCE separating data from denoiser samples, its NLL estimate against MDLM's
bound, and the entry points (training from an MDLM run, sampling with both energies)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy_networks
from helpers import small_config

from configs import ar, edlm, mdlm
from dlm import parallel, sampling
from dlm import runs as runs_lib
from dlm.diffusion import energy as energy_lib
from dlm.diffusion import masked, schedules
from dlm.models import registry as model_registry
from dlm.runs import checkpoint as checkpoint_lib
from dlm.sampling import networks
from dlm.training import experiment, trainer

VOCAB, N = 4, 20_000


def _tv(p, q):
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _diagonal_joint():
    """Two positions that are always equal, uniform over the VOCAB values."""
    log_joint = np.full((VOCAB, VOCAB), -np.inf, np.float32)
    np.fill_diagonal(log_joint, -np.log(VOCAB))
    return log_joint.reshape(-1)


def _energy_network(length):
    denoiser = toy_networks.JointDenoiser(VOCAB, length)
    return networks.EnergyDenoiser(denoiser.network(),
                                   toy_networks.JointResidualEnergy(VOCAB, length))


def _draw(name, network, params, length, batch_size=N, seed=0, **options):
    out = sampling.draw(sampling.get_sampler(name, **options), network, params,
                        jax.random.PRNGKey(seed), batch_size=batch_size, length=length).output
    return np.asarray(out.tokens_BL), np.asarray(out.nfe_B)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_importance_sampling_follows_the_closed_form(k):
    """One step reveals both positions. The factorised denoiser draws them independently,
    so the pair is equal with probability 1/V; the exact energy rules unequal pairs out, so
    with k candidates the step lands on the diagonal unless all k are off it:
    P(diagonal) = 1 - (1 - 1/V)^k, and TV to the true joint is (1 - 1/V)^k."""
    log_joint = _diagonal_joint()
    network = _energy_network(2)
    params = {"denoiser": jnp.asarray(log_joint), "energy": jnp.asarray(log_joint)}
    tokens, _ = _draw("edlm", network, params, 2, num_candidates=k, steps=1,
                      noise_removal=False)
    off = (1.0 - 1.0 / VOCAB) ** k
    expected = np.full((VOCAB, VOCAB), off / (VOCAB * VOCAB - VOCAB))
    np.fill_diagonal(expected, (1.0 - off) / VOCAB)
    empirical = toy_networks.empirical(tokens, VOCAB)
    assert _tv(empirical, expected.reshape(-1)) < toy_networks.tv_bound(expected.reshape(-1), N)
    truth = np.exp(log_joint.astype(np.float64))
    assert abs(_tv(empirical, truth) - off) < toy_networks.tv_bound(expected.reshape(-1), N)


def test_importance_sampling_moves_a_random_joint_towards_the_truth():
    """Three positions, a random strongly dependent joint, two steps: the factorised sampler
    is far from the joint; 16 candidates under the exact energy bring it much closer."""
    vocab, length = 3, 3
    log_joint = toy_networks.random_log_joint(np.random.default_rng(0), vocab, length)
    model = toy_networks.JointDenoiser(vocab, length)
    network = networks.EnergyDenoiser(model.network(),
                                      toy_networks.JointResidualEnergy(vocab, length))
    params = {"denoiser": jnp.asarray(log_joint), "energy": jnp.asarray(log_joint)}
    truth = np.exp(log_joint.astype(np.float64))
    distances = {}
    for k in (1, 16):
        tokens, _ = _draw("edlm", network, params, length, num_candidates=k, steps=2)
        distances[k] = _tv(toy_networks.empirical(tokens, vocab), truth)
    bound = toy_networks.tv_bound(truth, N)
    assert distances[1] > 4 * bound
    assert distances[16] < distances[1] / 3


@pytest.mark.parametrize("options", [{"num_candidates": 1},
                                     {"num_candidates": 4, "window_low": 0.0,
                                      "window_high": 0.0}])
def test_one_candidate_or_outside_the_window_is_mdlm_exactly(options):
    vocab, length = 3, 3
    log_joint = toy_networks.random_log_joint(np.random.default_rng(1), vocab, length)
    model = toy_networks.JointDenoiser(vocab, length)
    network = networks.EnergyDenoiser(model.network(),
                                      toy_networks.JointResidualEnergy(vocab, length))
    params = {"denoiser": jnp.asarray(log_joint), "energy": jnp.asarray(log_joint)}
    edlm_tokens, edlm_nfe = _draw("edlm", network, params, length, batch_size=64, steps=4,
                                  **options)
    mdlm_tokens, mdlm_nfe = _draw("mdlm", model.network(), jnp.asarray(log_joint), length,
                                  batch_size=64, steps=4)
    np.testing.assert_array_equal(edlm_tokens, mdlm_tokens)
    np.testing.assert_array_equal(edlm_nfe, mdlm_nfe)


def test_window_limits_the_energy_calls():
    log_joint = _diagonal_joint()
    network = _energy_network(2)
    params = {"denoiser": jnp.asarray(log_joint), "energy": jnp.asarray(log_joint)}
    _, inside = _draw("edlm", network, params, 2, batch_size=8, steps=4, noise_removal=False)
    _, half = _draw("edlm", network, params, 2, batch_size=8, steps=4, noise_removal=False,
                    window_low=0.6)
    _, plain = _draw("mdlm", network.denoiser, jnp.asarray(log_joint), 2, batch_size=8,
                     steps=4, noise_removal=False)
    # Steps start at t = 1, 0.75, 0.5, 0.25; rows finish once both positions are revealed.
    assert np.all(inside <= 2 * plain) and np.all(half <= plain + 2)
    assert np.all(inside >= plain + 1) and np.all(half >= plain + 1)


def test_sampler_errors():
    with pytest.raises(ValueError, match="num_candidates"):
        sampling.get_sampler("edlm", num_candidates=0)
    with pytest.raises(ValueError, match="window_low"):
        sampling.get_sampler("edlm", window_low=0.8, window_high=0.2)
    with pytest.raises(ValueError, match="energy_temperature"):
        sampling.get_sampler("edlm", energy_temperature=0.0)
    model = toy_networks.JointDenoiser(VOCAB, 2)
    with pytest.raises(ValueError, match=r"sampler 'edlm' cannot sample a masked diffusion "
                                         r"network: it needs a denoiser\+energy network"):
        _draw("edlm", model.network(), jnp.asarray(_diagonal_joint()), 2, batch_size=2)


def _tiny_model_config(name, vocab_size):
    config = model_registry.model_config("micro", name=name)
    config.update(hidden=16, layers=1, heads=2, kv_heads=2, cond_dim=16)
    return model_registry.build_model(config, vocab_size)


def test_ar_energy_against_prefix_by_prefix_scoring():
    vocab_size, length, batch = 6, 7, 3
    module = _tiny_model_config("transformer", vocab_size)
    params = model_registry.init_params(module, length, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, vocab_size - 1, (batch, length)).astype(np.int32)
    xt = np.where(rng.random((batch, length)) < 0.5, vocab_size - 1, x0).astype(np.int32)
    log_p = np.where(xt == vocab_size - 1, rng.normal(size=(batch, length)), 0.0)
    energy = sampling.energy_from_flax(module, "causal")(
        params, jnp.asarray(x0), jnp.asarray(xt), None, jnp.asarray(log_p, jnp.float32),
        vocab_size - 1)
    # Reference: one forward pass per prefix, with everything after it overwritten, so the
    # prediction of token i can only come from tokens < i.
    apply = jax.jit(lambda p, tokens: module.apply({"params": p}, tokens, None))
    expected = np.zeros(batch)
    for b in range(batch):
        for i in range(1, length):
            if xt[b, i] != vocab_size - 1:
                continue
            prefix = x0[b:b + 1].copy()
            prefix[:, i:] = (x0[b:b + 1, i:] + 1) % (vocab_size - 1)
            logits = apply(params, jnp.asarray(prefix))
            logits = np.asarray(logits[0, i - 1], np.float64)[:-1]  # the mask id excluded
            log_softmax = logits - np.logaddexp.reduce(logits)
            expected[b] += log_p[b, i] - log_softmax[x0[b, i]]
    np.testing.assert_allclose(np.asarray(energy), expected, rtol=1e-5, atol=1e-5)


def _toy_nce(nll_negatives=1):
    """EDLM-NCE on pairs (a, a, b, b) over 4 tokens; the denoiser is a fresh DiT, whose
    zero-initialised head makes p_theta uniform, so negatives rarely keep the pairs."""
    vocab_size, length = 5, 4
    diffusion = masked.MaskedDiffusion(schedules.LogLinearSchedule(), vocab_size - 1)
    process = energy_lib.EnergyNCE(diffusion, nll_negatives=nll_negatives)
    module = _tiny_model_config("energy", vocab_size)
    frozen = {"denoiser": _tiny_model_config("dit", vocab_size)}
    return process, module, frozen, vocab_size, length


def _pairs(rng, batch):
    a, b = rng.integers(0, 4, (2, batch))
    tokens = np.stack([a, a, b, b], axis=1).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones(tokens.shape, jnp.float32),
            "example_id": jnp.arange(batch, dtype=jnp.int32)}


def test_nce_separates_data_from_denoiser_samples():
    process, module, frozen, _, length = _toy_nce()
    state = process.init_state(parallel.frozen_params(process, frozen, length))
    params = model_registry.init_params(module, length, jax.random.PRNGKey(1))
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    def loss_fn(params, batch, rng):
        def fn(x0, t, **options):
            return module.apply({"params": params}, x0, t, train=False, **options)
        return process.loss(fn, batch, rng, num_examples=64, state=state,
                            frozen=parallel.frozen_fns(frozen, state))

    @jax.jit
    def update(params, opt_state, batch, rng):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    losses = []
    for step in range(200):
        params, opt_state, loss = update(params, opt_state, _pairs(rng, 64),
                                         jax.random.PRNGKey(step))
        losses.append(float(loss))
    assert losses[0] == pytest.approx(math.log(4), abs=1e-5)  # E = 0 at initialisation
    assert np.mean(losses[-40:]) < 0.7 * math.log(4)


def test_nce_nll_with_a_zero_energy_is_mdlm_bound_of_the_denoiser():
    process, module, frozen, vocab_size, length = _toy_nce(nll_negatives=3)
    state = process.init_state(parallel.frozen_params(process, frozen, length))
    # A trained-looking denoiser: random (non-zero) weights everywhere.
    state = {"denoiser": jax.tree.map(
        lambda x: 0.3 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape),
        state["denoiser"])}
    params = model_registry.init_params(module, length, jax.random.PRNGKey(1))  # E == 0
    batch = _pairs(np.random.default_rng(0), 16)
    rng = jax.random.PRNGKey(3)

    def energy_fn(x0, t, **options):
        return module.apply({"params": params}, x0, t, train=False, **options)

    def denoiser_fn(xt, t, **options):
        return frozen["denoiser"].apply({"params": state["denoiser"]}, xt, t, train=False)

    nll, count = process.nll(energy_fn, batch, rng, num_examples=16, state=state,
                             frozen=parallel.frozen_fns(frozen, state))
    noise_rng = jax.random.split(jax.random.split(rng)[0])[0]  # what the pair draws from
    reference, ref_count = process.diffusion.nll(denoiser_fn, batch, noise_rng,
                                                 num_examples=16)
    np.testing.assert_allclose(nll, reference, rtol=1e-5)
    np.testing.assert_array_equal(count, ref_count)
    assert float(jnp.sum(reference)) > 0


def test_nce_config_errors(tmp_path):
    config = edlm.get_config("micro")
    from dlm.diffusion import process as process_lib
    with pytest.raises(ValueError, match="init_from"):
        process_lib.make_process(config, vocab_size=10)
    config.init_from = "x"
    config.process.nll_negatives = 0
    with pytest.raises(ValueError, match="nll_negatives"):
        process_lib.make_process(config, vocab_size=10)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """A tiny MDLM, a tiny AR (the EDLM-AR energy) and an EDLM-NCE run from the MDLM."""
    root = tmp_path_factory.mktemp("edlm")
    trainer.train(small_config(data_dir, mdlm, total_steps=4, checkpoint_every=4),
                  root / "mdlm")
    trainer.train(small_config(data_dir, ar, total_steps=4, checkpoint_every=4), root / "ar")
    final = trainer.train(small_config(data_dir, edlm, total_steps=4, checkpoint_every=4,
                                       eval_every=4, init_from=str(root / "mdlm")),
                          root / "nce")
    return root, final


def test_nce_run_starts_from_the_mdlm_and_keeps_it_frozen(runs, data_dir):
    root, final = runs
    assert math.isfinite(final["eval/nll_nats_per_token"])
    mdlm_params, _ = runs_lib.load_weights(root / "mdlm", parallel.make_mesh())
    exp = experiment.build(runs_lib.load_config(root / "nce"))
    state, _ = checkpoint_lib.restore_from_workdir(
        root / "nce", checkpoint_lib.abstract_like(exp.init_state()))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.process_state["denoiser"]),
                 jax.device_get(mdlm_params))
    # Shared weights started from the MDLM and moved; the time embedding is one of them.
    assert "fuse" in state.params and "final" not in state.params
    scored = trainer.evaluate_workdir(root / "nce")
    np.testing.assert_allclose(scored["eval/nll_nats_per_token"],
                               final["eval/nll_nats_per_token"], rtol=1e-5)


def test_nce_from_a_different_size_fails_clearly(runs, data_dir, tmp_path):
    root, _ = runs
    config = small_config(data_dir, edlm, total_steps=1, init_from=str(root / "mdlm"))
    config.model.hidden = 64
    with pytest.raises(ValueError, match="shape"):
        trainer.train(config, tmp_path / "bad")


@pytest.mark.parametrize("energy", ["ar", "nce"])
def test_sample_with_either_energy(runs, tmp_path, energy):
    root, _ = runs
    out = tmp_path / "samples.jsonl"
    summary = runs_lib.sample_to_file(
        str(root / "mdlm"), "edlm", str(out), num_samples=4, length=32, batch_size=4,
        energy_workdir=str(root / energy), judge_workdir=str(root / "ar"),
        overrides={"num_candidates": 3, "steps": 8})
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and all(len(r["tokens"]) == 32 for r in records)
    assert math.isfinite(summary["gen_ppl"])
    # 8 steps + noise removal, plus one energy call per step in the window (all but the
    # argmax step).
    assert 8 < summary["mean_nfe"] <= 9 + 8


def test_sample_entry_errors(runs, tmp_path):
    root, _ = runs
    out = str(tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match="needs --energy_workdir"):
        runs_lib.sample_to_file(str(root / "mdlm"), "edlm", out, num_samples=1)
    with pytest.raises(ValueError, match="only for edlm"):
        runs_lib.sample_to_file(str(root / "mdlm"), "mdlm", out, num_samples=1,
                               energy_workdir=str(root / "ar"))
    with pytest.raises(ValueError, match="energy run"):
        runs_lib.sample_to_file(str(root / "nce"), "mdlm", out, num_samples=1)
    with pytest.raises(ValueError, match="neither an AR run"):
        runs_lib.sample_to_file(str(root / "mdlm"), "edlm", out, num_samples=1,
                               energy_workdir=str(root / "mdlm"))
