"""Autoregressive process: next-token cross-entropy against a numpy reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm.diffusion import autoregressive, process

VOCAB = 5  # ids 0..3 real, 4 = mask


def _problem(seed=0, batch_size=3, length=6):
    k_tok, k_logits = jax.random.split(jax.random.key(seed))
    tokens = np.array(jax.random.randint(k_tok, (batch_size, length), 0, VOCAB - 1))
    tokens[1, 4:] = VOCAB - 1  # padding that holds the mask id
    tokens[2, 5:] = 0
    loss_mask = np.ones((batch_size, length), np.float32)
    loss_mask[1, 4:] = 0
    loss_mask[2, 5:] = 0
    loss_mask[2, 0] = 0  # a pad before real tokens: token 1 is not scored
    logits = 3 * np.array(jax.random.normal(k_logits, (batch_size, length, VOCAB)))
    logits[..., VOCAB - 1] += 10.0  # a mask logit the process must ignore
    batch = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "loss_mask": jnp.asarray(loss_mask),
        "example_id": jnp.arange(batch_size, dtype=jnp.int32),
    }
    return batch, tokens, loss_mask, logits


def _reference_nll(tokens, loss_mask, logits):
    """Per-sequence (nll_sum, count): logits at i score token i+1, mask id excluded."""
    nll_sum, count = np.zeros(len(tokens)), np.zeros(len(tokens))
    for b in range(len(tokens)):
        for i in range(tokens.shape[1] - 1):
            if loss_mask[b, i] and loss_mask[b, i + 1]:
                real = logits[b, i, : VOCAB - 1].astype(np.float64)
                log_z = np.log(np.sum(np.exp(real)))
                nll_sum[b] += log_z - real[tokens[b, i + 1]]
                count[b] += 1
    return nll_sum, count


@pytest.mark.parametrize("mask_id", [None, VOCAB - 1])
def test_nll_and_loss_match_hand_computed_cross_entropy(mask_id):
    batch, tokens, loss_mask, logits = _problem()
    seen = []

    def model_fn(tokens_BL, t_B):
        seen.append((tokens_BL, t_B))
        return jnp.asarray(logits)

    ar = autoregressive.Autoregressive(mask_id=mask_id)
    nll_sum, count = ar.nll(model_fn, batch, jax.random.key(0), num_examples=3)
    ref_sum, ref_count = _reference_nll(tokens, loss_mask, logits)
    np.testing.assert_allclose(nll_sum, ref_sum, rtol=1e-5)
    np.testing.assert_array_equal(count, [5, 3, 3])
    np.testing.assert_array_equal(count, ref_count)
    # The network sees the full, uncorrupted tokens and no time.
    np.testing.assert_array_equal(seen[0][0], tokens)
    assert seen[0][1] is None

    loss, metrics = ar.loss(model_fn, batch, jax.random.key(1), num_examples=3)
    assert float(metrics["loss_sum"]) == pytest.approx(ref_sum.sum(), rel=1e-5)
    assert float(metrics["token_count"]) == ref_count.sum()
    assert float(loss) == pytest.approx(ref_sum.sum() / ref_count.sum(), rel=1e-5)


def test_mask_token_gets_zero_probability_and_no_gradient():
    batch, _, _, logits = _problem(seed=1)
    ar = autoregressive.Autoregressive()

    def loss_fn(logits):
        return ar.loss(lambda x, t: logits, batch, jax.random.key(0), num_examples=3)[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits))
    assert np.isfinite(loss)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[..., VOCAB - 1] == 0)
    # Padding and the unused last position get no gradient.
    assert np.all(grad[1, 3:] == 0) and np.all(grad[:, -1] == 0)
    # Shifting the mask logit changes nothing.
    shifted = logits.copy()
    shifted[..., VOCAB - 1] -= 50.0
    assert float(loss_fn(jnp.asarray(shifted))) == pytest.approx(float(loss), rel=1e-6)


def test_loss_is_exact_for_a_known_distribution():
    # A model that puts probability 1/2 on the true next token and 1/6 on each other real one.
    tokens = jnp.array([[0, 1, 2, 3, 0, 1]], jnp.int32)
    next_tok = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    logits = jnp.where(jax.nn.one_hot(next_tok, VOCAB) > 0, jnp.log(3.0), 0.0)
    batch = {"tokens": tokens, "loss_mask": jnp.ones((1, 6)), "example_id": jnp.zeros(1, jnp.int32)}
    loss, metrics = autoregressive.Autoregressive().loss(
        lambda x, t: logits, batch, jax.random.key(0), num_examples=1
    )
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)
    assert float(metrics["token_count"]) == 5


def test_make_process_ar():
    config = ml_collections.ConfigDict({"process": {"name": "ar"}, "model": {"vocab_size": 9}})
    ar = process.make_process(config)
    assert ar == autoregressive.Autoregressive(mask_id=8)
    assert ar.network_kind == "causal"
    with pytest.raises(ValueError, match=r"process\.name.*mdlm, bd3lm, ar"):
        process.make_process(ml_collections.ConfigDict({"process": {"name": "gpt"}}))
