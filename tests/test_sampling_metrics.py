"""dlm/evaluation/generative.py: judge NLL, entropy, the text mask, speed."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm.evaluation import generative
from dlm.models import build_model, model_config

V = 16


def test_unigram_entropy():
    assert generative.unigram_entropy(np.array([4, 4, 4, 4])) == 0.0
    assert math.isclose(generative.unigram_entropy(np.arange(8)), math.log(8))
    assert math.isclose(generative.unigram_entropy(np.array([1, 1, 2, 2])), math.log(2))
    assert generative.unigram_entropy(np.array([], np.int32)) == 0.0


def test_scored_mask():
    tokens = np.array([[5, 6, 0, 7, 1, 1], [5, 15, 6, 7, 8, 9]])  # eos 0, pad 1, mask 15
    np.testing.assert_array_equal(
        generative.scored_mask(tokens, mask_id=15, pad_id=1),
        [[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        generative.scored_mask(tokens, mask_id=15, pad_id=1, end_id=0),
        [[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1]])
    start = np.array([[False, False, False, True, True, True]])  # an EOS in the prompt
    tokens = np.array([[5, 0, 6, 7, 0, 8]])
    np.testing.assert_array_equal(
        generative.scored_mask(tokens, mask_id=15, end_id=0, start_BL=start),
        [[1, 1, 1, 1, 1, 0]])


def test_judge_nll_matches_a_direct_computation():
    config = model_config("micro", "transformer")
    config.update(hidden=32, layers=2, heads=2, kv_heads=2, dropout=0.0, mask=str(config.mask))
    model = build_model(config, V)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))["params"]
    tokens = np.random.default_rng(0).integers(0, V - 1, (3, 12)).astype(np.int32)
    valid = np.ones((3, 12), bool)
    valid[2, 9:] = False

    def direct(row, keep, start, stop):
        logits = model.apply({"params": params}, jnp.asarray(row[None, start:stop]))[0]
        log_probs = jax.nn.log_softmax(logits.at[:, V - 1].set(-jnp.inf))
        scored = [(i, row[start + i + 1]) for i in range(stop - start - 1)
                  if keep[start + i] and keep[start + i + 1]]
        return -sum(float(log_probs[i, t]) for i, t in scored), len(scored)

    for window in (12, 5):
        nll, count = generative.make_judge_nll(model, window=window)(params, tokens, valid)
        for b in range(3):
            parts = [direct(tokens[b], valid[b], s, min(s + window, 12))
                     for s in range(0, 12, window)]
            assert math.isclose(float(nll[b]), sum(p[0] for p in parts), rel_tol=1e-4)
            assert int(count[b]) == sum(p[1] for p in parts)
    assert int(count[2]) == 4 + 3 + 0  # windows [0, 5), [5, 10), [10, 12); 9.. invalid


def test_perplexity_and_speed():
    assert math.isclose(generative.generative_perplexity([2.0, 4.0], [3, 3]), math.exp(1.0))
    assert math.isnan(generative.generative_perplexity([0.0], [0]))
    metrics = generative.speed(1000, 2.0, 12.5)
    assert metrics == {"tokens_per_second": 500.0, "seconds": 2.0, "mean_nfe": 12.5}
