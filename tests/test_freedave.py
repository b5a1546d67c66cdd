"""FreeDave (`dlm.sampling.freedave`) against the static decode it verifies.

The reference is the static decode itself (`llada`, `bd3lm` one token per step) under the
same key: FreeDave must return its tokens exactly, in at most its network calls, on a DiT,
a block-causal DiT and an imported LLaDA-layout network; each row of a batch decoded alone
gives the same answer; and a toy network whose logits never change lets every draft
through, so a call advances K static steps.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_kv_reuse
import test_sampling_bd3lm

from dlm import sampling
from dlm.diffusion import LogLinearSchedule, MaskedDiffusion


@pytest.fixture(scope="module")
def dit():
    # Perturbed less than kv_reuse's DiT: at 0.3 its adaLN scales blow the residual stream up
    # to ~1e4 and a one-ulp difference between the batch-B and the batch-KB matmul (XLA CPU
    # blocks them differently) reached 4e-3 in the logits and flipped sampled tokens on one
    # machine. At 0.15 the difference is ~4e-6 on logits up to 7 (top-1 mean 0.39).
    model, params = test_kv_reuse._dit(scale=0.15)
    vocab = sampling.Vocab(mask_id=test_kv_reuse.V - 1, eos_id=0, pad_id=1)
    network = sampling.from_flax(model, MaskedDiffusion(LogLinearSchedule(),
                                                        test_kv_reuse.V - 1))
    return dataclasses.replace(network, vocab=vocab), params


llada = test_kv_reuse.llada  # an imported LLaDA-layout folder (module fixture)


def _draw(network, params, name, prompt=(1, 2, 3, 4, 5), batch=3, length=test_kv_reuse.L,
          **options):
    return test_kv_reuse._draw(network, params, name, batch=batch, length=length,
                               prompt=prompt, **options)


@pytest.mark.parametrize("options", [
    {},  # greedy, one token per step in blocks of 32 (the paper's static decode)
    {"block_length": 8, "temperature": 1.0},  # sampled: lossless under the same key
    {"block_length": None, "steps": 16, "temperature": 1.0, "remasking": "random"},
])
@pytest.mark.parametrize("drafts", [2, pytest.param(5, marks=pytest.mark.slow)])
def test_freedave_equals_the_static_decode_on_a_dit(dit, options, drafts):
    network, params = dit
    static = _draw(network, params, "llada", **options)
    ours = _draw(network, params, "freedave", drafts=drafts, **options)
    np.testing.assert_array_equal(ours.tokens_BL, static.tokens_BL)
    np.testing.assert_array_equal(ours.commit_step_BL, static.commit_step_BL)
    np.testing.assert_allclose(ours.confidence_BL, static.confidence_BL, rtol=1e-4)
    assert int(ours.nfe) < int(static.nfe)
    # K sequences per verifying call, one per refreshing call.
    assert np.all(ours.token_forwards_B <= drafts * test_kv_reuse.L * ours.nfe_B)


def test_one_draft_is_the_static_decode(dit):
    network, params = dit
    static = _draw(network, params, "llada")
    ours = _draw(network, params, "freedave", drafts=1)
    np.testing.assert_array_equal(ours.tokens_BL, static.tokens_BL)
    assert int(ours.nfe) == int(static.nfe)


def test_freedave_on_an_imported_llada(llada):
    network, params = llada
    options = {"block_length": 8}
    static = _draw(network, params, "llada", **options)
    ours = _draw(network, params, "freedave", drafts=4, **options)
    np.testing.assert_array_equal(ours.tokens_BL, static.tokens_BL)
    assert int(ours.nfe) <= int(static.nfe)


def test_rows_with_different_prompts_equal_each_row_alone(dit):
    network, params = dit
    length = test_kv_reuse.L
    tokens_BL = np.full((3, length), network.vocab.mask_id, np.int32)
    known_BL = np.zeros((3, length), bool)
    for row, prompt_len in enumerate((2, 5, 9)):
        tokens_BL[row, :prompt_len] = np.arange(2, 2 + prompt_len) + row
        known_BL[row, :prompt_len] = True
    known_BL[1, 20:23] = True  # infilling context inside a row
    tokens_BL[1, 20:23] = (7, 8, 9)

    def draw(name, tokens, known, **options):
        return sampling.draw(sampling.get_sampler(name, block_length=8, **options), network,
                             params, jax.random.PRNGKey(0), tokens_BL=tokens,
                             known_BL=known).output

    batch = draw("freedave", tokens_BL, known_BL, drafts=4)
    np.testing.assert_array_equal(batch.tokens_BL,
                                  draw("llada", tokens_BL, known_BL).tokens_BL)
    for row in range(3):
        alone = draw("freedave", tokens_BL[row:row + 1], known_BL[row:row + 1], drafts=4)
        np.testing.assert_array_equal(alone.tokens_BL[0], batch.tokens_BL[row])
        assert np.all(alone.tokens_BL[0][known_BL[row]] == tokens_BL[row][known_BL[row]])


@pytest.fixture(scope="module")
def block_dit():
    model, params = test_sampling_bd3lm._dit(2, block_size=4)
    return test_sampling_bd3lm._network(model, 4), params


@pytest.mark.parametrize("options", [
    {"policy": "fixed_count", "temperature": 0.0},
    pytest.param({"policy": "fixed_count", "temperature": 1.0, "steps": 2},
                 marks=pytest.mark.slow),
    pytest.param({"policy": "fixed_count", "temperature": 0.0, "kv_cache": False},
                 marks=pytest.mark.slow),
])
def test_freedave_equals_bd3lm_on_a_block_diffusion_network(block_dit, options):
    network, params = block_dit
    static = _draw(network, params, "bd3lm", prompt=(2, 3, 4, 5), length=16, **options)
    ours = _draw(network, params, "bd3lm", prompt=(2, 3, 4, 5), length=16, freedave=4,
                 **options)
    np.testing.assert_array_equal(ours.tokens_BL, static.tokens_BL)
    assert int(ours.nfe) <= int(static.nfe)


class _Constant:
    """Logits that ignore the input: the drafted steps are exactly the static ones."""

    def __call__(self, params, tokens_BL, t_B):
        del t_B
        batch, length = tokens_BL.shape
        return jnp.broadcast_to(params, (batch, length, params.shape[-1]))


def test_unchanging_logits_accept_every_draft():
    vocab_size, length = 6, 24
    network = sampling.Denoiser(_Constant(), sampling.Vocab(mask_id=vocab_size - 1))
    logits_LV = jax.random.normal(jax.random.PRNGKey(3), (length, vocab_size)) * 3.0
    static = _draw(network, logits_LV, "llada", prompt=(0,), batch=2, length=length,
                   block_length=None)
    ours = _draw(network, logits_LV, "freedave", prompt=(0,), batch=2, length=length,
                 block_length=None, drafts=4)
    np.testing.assert_array_equal(ours.tokens_BL, static.tokens_BL)
    assert int(static.nfe) == length - 1
    # One refreshing call, then every call verifies 4 drafts and keeps them all; the last
    # call is skipped when its first draft completes the sequence.
    assert int(ours.nfe) == 1 + -(-(length - 1 - 1) // 4)


@pytest.mark.slow
def test_freedave_stops_at_eos_like_the_static_decode(dit):
    network, params = dit
    options = {"stop_at_eos": True, "block_length": 8, "temperature": 1.0}
    static = _draw(network, params, "llada", **options)
    ours = _draw(network, params, "freedave", drafts=3, **options)
    np.testing.assert_array_equal(ours.tokens_BL, static.tokens_BL)


def test_freedave_options_are_checked():
    with pytest.raises(ValueError, match="drafts=0"):
        sampling.get_sampler("freedave", drafts=0)
    with pytest.raises(ValueError, match="freedave=-1"):
        sampling.get_sampler("bd3lm", freedave=-1)
    with pytest.raises(ValueError, match="sub-block cache"):
        sampling.get_sampler("bd3lm", freedave=2, sub_block=2, cache="dual")
