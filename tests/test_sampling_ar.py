"""Autoregressive sampling through the KV cache on a tiny random causal Transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_networks

from dlm import sampling
from dlm.diffusion import Autoregressive
from dlm.models import build_model, model_config

V = 24  # mask id 23
L = 12


@pytest.fixture(scope="module")
def transformer():
    config = model_config("micro", "transformer")
    config.update(hidden=32, layers=2, heads=2, kv_heads=2, dropout=0.0, mask=str(config.mask))
    model = build_model(config, V)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))["params"]
    return model, params, sampling.from_flax(model, Autoregressive(mask_id=V - 1))


def _greedy_by_full_forwards(model, params, prompt_BP, length):
    """Greedy decoding without a cache: a full causal forward per token. The sequence is
    padded to `length` (one compilation); causality keeps the padding out of row p - 1."""
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens, train=False))
    batch, prompt_len = prompt_BP.shape
    tokens = np.zeros((batch, length), np.int32)
    tokens[:, :prompt_len] = prompt_BP
    for p in range(prompt_len, length):
        logits = forward(jnp.asarray(tokens))[:, p - 1]
        logits = logits.at[:, V - 1].set(-jnp.inf)  # the mask id is never predicted
        tokens[:, p] = np.asarray(jnp.argmax(logits, -1))
    return tokens


@pytest.mark.parametrize("prompt_len", [1, 4])
def test_greedy_with_cache_equals_greedy_by_full_forwards(transformer, prompt_len):
    model, params, network = transformer
    prompt = np.random.default_rng(prompt_len).integers(0, V - 1, (3, prompt_len))
    out = sampling.draw(sampling.get_sampler("ar", temperature=0.0), network, params,
                        jax.random.PRNGKey(0), batch_size=3, length=L, prompt=prompt).output
    np.testing.assert_array_equal(out.tokens_BL, _greedy_by_full_forwards(model, params,
                                                                         prompt, L))
    prefill_calls = int(prompt_len > 1)
    assert int(out.nfe) == L - prompt_len + prefill_calls


def test_top_k_one_is_greedy_and_sampling_varies(transformer):
    _, params, network = transformer
    run = lambda **options: np.asarray(sampling.draw(
        sampling.get_sampler("ar", **options), network, params, jax.random.PRNGKey(0),
        batch_size=8, length=L, prompt=[5]).output.tokens_BL)
    greedy = run(temperature=0.0)
    np.testing.assert_array_equal(run(top_k=1), greedy)
    np.testing.assert_array_equal(run(top_p=1e-6), greedy)
    sampled = run(temperature=1.5)
    assert len({tuple(row) for row in sampled}) > 1
    assert not np.any(sampled == V - 1)


def test_stop_at_eos_ends_the_sample():
    log_joint = toy_networks.random_log_joint(np.random.default_rng(2), 3, 5)
    model = toy_networks.JointCausalLM(3, 5)  # eos_id 0, pad_id 1
    sampler = sampling.get_sampler("ar", stop_at_eos=True, eos_fill="pad")
    out = sampling.draw(sampler, model.network(), jnp.asarray(log_joint),
                        jax.random.PRNGKey(0), batch_size=256, length=5, prompt=[2]).output
    tokens = np.asarray(out.tokens_BL)
    ended = np.zeros(len(tokens), bool)
    for b, row in enumerate(tokens):
        eos = np.flatnonzero(row[1:] == 0)
        if eos.size:
            ended[b] = eos[0] < 3
            np.testing.assert_array_equal(row[eos[0] + 2:], 1)
            assert out.nfe_B[b] == eos[0] + 1  # no calls after its EOS
    assert ended.any() and int(out.nfe) == 4


def test_autoregressive_needs_a_first_token(transformer):
    _, params, network = transformer
    with pytest.raises(ValueError, match="needs a prompt of at least one token"):
        sampling.draw(sampling.get_sampler("ar"), network, params, jax.random.PRNGKey(0),
                      batch_size=2, length=L)
