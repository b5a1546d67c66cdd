"""One token per step from exact conditionals reproduces the joint: a toy model with 3 tokens
and 3 positions (27 sequences), 20,000 draws, total variation against a derived bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_networks

from dlm import sampling

VOCAB, LENGTH, N = 3, 3, 20_000


@pytest.fixture(scope="module")
def joint():
    log_joint = toy_networks.random_log_joint(np.random.default_rng(0), VOCAB, LENGTH)
    return toy_networks.JointDenoiser(VOCAB, LENGTH), log_joint


def _tv(p, q):
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _draw(name, network, log_joint, length, prompt=None, **options):
    out = sampling.draw(sampling.get_sampler(name, **options), network,
                        jnp.asarray(log_joint), jax.random.PRNGKey(0), batch_size=N,
                        length=length, prompt=prompt).output
    return np.asarray(out.tokens_BL)


@pytest.mark.parametrize("name,options", [
    ("first_hitting", {}),
    ("first_hitting", {"gumbel_dtype": "float32"}),
    ("llada", {"remasking": "random", "temperature": 1.0, "block_length": None}),
    ("dream", {"alg": "random", "temperature": 1.0, "top_p": 1.0}),
    # 250 grid steps for 3 positions: two reveals share a step with probability ~0.012, which
    # moves the law by at most 0.012 * TV(joint, product of conditionals) ~ 0.005.
    ("ddpm_cache", {"steps": 250}),
])
def test_one_token_per_step_samples_the_joint(joint, name, options):
    model, log_joint = joint
    probs = np.exp(log_joint.astype(np.float64))
    tokens = _draw(name, model.network(), log_joint, LENGTH, **options)
    assert _tv(toy_networks.empirical(tokens, VOCAB), probs) < toy_networks.tv_bound(probs, N)


def test_the_test_can_tell_the_joint_from_its_marginals(joint):
    model, log_joint = joint
    probs = np.exp(log_joint.astype(np.float64))
    # All positions at once from p(x_l | nothing): the product of the marginals.
    tokens = _draw("llada", model.network(), log_joint, LENGTH, steps=1, block_length=None,
                   temperature=1.0)
    assert _tv(toy_networks.empirical(tokens, VOCAB), probs) > 3 * toy_networks.tv_bound(probs, N)


def test_infilling_samples_the_conditional(joint):
    model, log_joint = joint
    probs = np.exp(log_joint.astype(np.float64)).reshape(VOCAB, VOCAB, VOCAB)
    conditional = probs[:, 2, :] / probs[:, 2, :].sum()  # p(x_0, x_2 | x_1 = 2)
    template = np.full((N, LENGTH), 2, np.int32)
    known = np.zeros((N, LENGTH), bool)
    known[:, 1] = True
    out = sampling.draw(sampling.get_sampler("first_hitting"), model.network(),
                        jnp.asarray(log_joint), jax.random.PRNGKey(1), tokens_BL=template,
                        known_BL=known).output
    tokens = np.asarray(out.tokens_BL)[:, [0, 2]]
    bound = toy_networks.tv_bound(conditional.ravel(), N)
    assert _tv(toy_networks.empirical(tokens, VOCAB), conditional.ravel()) < bound


def test_autoregressive_samples_the_joint():
    log_joint = toy_networks.random_log_joint(np.random.default_rng(1), VOCAB, LENGTH + 1)
    probs = np.exp(log_joint.astype(np.float64)).reshape(VOCAB, -1)
    conditional = probs[1] / probs[1].sum()  # p(x_1, x_2, x_3 | x_0 = 1)
    model = toy_networks.JointCausalLM(VOCAB, LENGTH + 1)
    tokens = _draw("ar", model.network(), log_joint, LENGTH + 1, prompt=[1])
    bound = toy_networks.tv_bound(conditional, N)
    assert _tv(toy_networks.empirical(tokens[:, 1:], VOCAB), conditional) < bound
