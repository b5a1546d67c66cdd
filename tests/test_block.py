"""Block diffusion (BD3-LM): the two limits (b = L is MDLM, b = 1 is AR), block times, the
clipped-schedule search, config errors, and training / fine-tuning through the trainer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from configs import bd3lm, mdlm
from dlm.data import pipeline
from dlm.diffusion import block, masked, process, schedules
from dlm.models import registry as model_registry
from dlm.parallel import model_fn as bind_model
from dlm.runs import checkpoint as checkpoint_lib
from dlm.training import experiment, trainer

VOCAB = 12
MASK = VOCAB - 1


def _network(length, seed=0, scale=0.3):
    """A small DiT whose parameters are all perturbed (its output layer starts at zero)."""
    config = small_config("/unused").model
    module = model_registry.build_model(config, VOCAB)
    params = module.init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32), None)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    return module, params


def _batch(num_examples, length, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (num_examples, length), 0, MASK)
    return {"tokens": tokens.astype(jnp.int32),
            "loss_mask": jnp.ones((num_examples, length), jnp.float32),
            "example_id": jnp.arange(num_examples, dtype=jnp.int32)}


def test_block_size_L_is_the_mdlm_loss():
    length = 8
    module, params = _network(2 * length)
    fn = bind_model(module, params, train=False)
    batch, rng = _batch(16, length), jax.random.PRNGKey(7)
    schedule = schedules.LogLinearSchedule()
    mdlm_losses = masked.MaskedDiffusion(schedule, MASK).token_losses(fn, batch, rng, 16)
    bd3_losses = block.BlockDiffusion(schedule, MASK, block_size=length).token_losses(
        fn, batch, rng, 16)
    assert np.count_nonzero(mdlm_losses) > 20  # many masked tokens, so the test can fail
    np.testing.assert_allclose(bd3_losses, mdlm_losses, rtol=2e-5, atol=1e-6)


def _exact_ar_nll(module, params, tokens_BL, mask="causal"):
    """sum_i -log p(x_i | x_<i) [B] from an ordinary forward pass with a causal mask over
    x_<i, a mask token at i (and tokens after it that a causal query cannot see): a code path
    independent of the two-stream mask. One row per (i, example)."""
    batch, length = tokens_BL.shape
    at_i_LL = np.eye(length, dtype=bool)
    inputs_LBL = jnp.where(at_i_LL[:, None, :], MASK, tokens_BL[None])
    logits_LBLV = module.apply({"params": params}, inputs_LBL.reshape(length * batch, length),
                               None, mask=mask).reshape(length, batch, length, -1)
    logits_BLV = jnp.einsum("ibiv->biv", logits_LBLV)  # row i's logits at position i
    log_probs_BLV = jax.nn.log_softmax(process.exclude_token(logits_BLV, MASK))
    return -np.asarray(jnp.take_along_axis(log_probs_BLV, tokens_BL[..., None], -1)).sum((1, 2))


def test_block_size_1_with_every_token_masked_gives_the_ar_conditionals():
    length = 8
    module, params = _network(2 * length, seed=3)
    fn = bind_model(module, params, train=False)
    batch = _batch(8, length, seed=1)
    # t = 1 with eps = 0 masks every token and weighs it by 1: the loss is then sum_i
    # -log p(x_i | x_<i) read off the two-stream pass.
    diffusion = block.BlockDiffusion(schedules.LogLinearSchedule(eps=0.0), MASK, block_size=1)
    losses = diffusion.token_losses(fn, batch, jax.random.PRNGKey(0), 8, clip=(1.0, 1.0))
    exact = _exact_ar_nll(module, params, batch["tokens"])
    np.testing.assert_allclose(np.asarray(losses).sum(1), exact, rtol=1e-4)
    wrong = _exact_ar_nll(module, params, batch["tokens"], mask="full")
    assert np.abs(wrong - exact).max() > 1e-2  # a differently-wired network is told apart


def test_block_size_1_expected_nelbo_is_the_ar_nll():
    length, num_examples, draws = 8, 8, 512
    module, params = _network(2 * length, seed=3, scale=0.1)
    fn = bind_model(module, params, train=False)
    batch = _batch(num_examples, length, seed=1)
    # eps = 0: mask_prob(t) * w(t) = 1, so each token's expected loss is exactly its AR term.
    diffusion = block.BlockDiffusion(schedules.LogLinearSchedule(eps=0.0), MASK, block_size=1,
                                     t_min=0.05)
    nll = jax.jit(jax.vmap(lambda rng: diffusion.nll(fn, batch, rng,
                                                     num_examples=num_examples)[0]))
    totals_R = np.asarray(nll(jax.random.split(jax.random.PRNGKey(0), draws))).sum(1)
    estimate, stderr = totals_R.mean(), totals_R.std() / np.sqrt(draws)
    exact = _exact_ar_nll(module, params, batch["tokens"]).sum()
    assert stderr < 0.02 * exact  # tight enough to mean something
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


def test_block_times_stratified_over_examples_and_blocks_and_shard_invariant():
    diffusion = block.BlockDiffusion(schedules.LogLinearSchedule(), MASK, block_size=2,
                                     t_min=1e-3)
    ids = jnp.arange(4, dtype=jnp.int32)
    rng = jax.random.PRNGKey(5)
    t_BN = np.asarray(diffusion.sample_block_times(rng, ids, 4, 4, clip=(0.2, 0.6)))
    assert t_BN.shape == (4, 4) and t_BN.min() >= 0.2 and t_BN.max() <= 0.6
    strata = np.floor((t_BN - 0.2) / 0.4 * 16).astype(int).ravel()
    np.testing.assert_array_equal(np.sort(strata), np.arange(16))
    half = diffusion.sample_block_times(rng, ids[2:], 4, 4, clip=(0.2, 0.6))
    np.testing.assert_array_equal(half, t_BN[2:])
    # A clip below t_min never draws below t_min.
    low = diffusion.sample_block_times(rng, ids, 4, 4, clip=(0.0, 0.01))
    assert float(low.min()) >= 1e-3


def test_training_loss_uses_the_state_interval_and_nll_does_not():
    length = 8
    module, params = _network(2 * length)
    fn = bind_model(module, params, train=False)
    batch, rng = _batch(8, length), jax.random.PRNGKey(2)
    diffusion = block.BlockDiffusion(schedules.LogLinearSchedule(), MASK, block_size=4,
                                     clip=(0.3, 0.5))
    state = diffusion.init_state(None)
    np.testing.assert_allclose(state["clip"], [0.3, 0.5])
    clipped, _ = diffusion.loss(fn, batch, rng, num_examples=8, state=state)
    unclipped, _ = diffusion.loss(fn, batch, rng, num_examples=8)
    assert float(clipped) != pytest.approx(float(unclipped))
    manual = diffusion.token_losses(fn, batch, rng, 8, clip=(0.3, 0.5)).sum() / (8 * length)
    assert float(clipped) == pytest.approx(float(manual), rel=1e-6)
    nll_sum, _ = diffusion.nll(fn, batch, rng, num_examples=8)
    np.testing.assert_allclose(nll_sum.sum() / (8 * length), unclipped, rtol=1e-5)


def test_clip_search_picks_the_lowest_variance_interval():
    diffusion = block.BlockDiffusion(schedules.LogLinearSchedule(), MASK, block_size=4,
                                     clip_search_widths=(0.5,), clip_search_step=0.25)
    assert diffusion.clip_candidates() == [(0.0, 0.5), (0.0, 1.0), (0.25, 0.75), (0.5, 1.0)]
    noise = np.random.default_rng(0).normal(size=1000)

    def statistic_of(candidate):
        return noise * (1.0 + 10 * abs(candidate[0] - 0.25))

    state, metrics = diffusion.search_state(statistic_of)
    np.testing.assert_allclose(state["clip"], [0.25, 0.75])
    assert metrics["clip/min"] == 0.25 and metrics["clip/max"] == 0.75
    assert metrics["clip/nelbo_var"] < metrics["clip/nelbo_var_unclipped"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _bd3_config(data_dir, **overrides):
    settings = {"block_size": 4, "process.clip_search_widths": (0.5,),
                "process.clip_search_step": 0.5, "process.search_batches": 1}
    return small_config(data_dir, bd3lm, **{**settings, **overrides})


@pytest.mark.parametrize("key, value, message", [
    ("block_size", 5, "config.block_size=5 does not divide config.data.seq_len=32"),
    ("block_size", 0, "config.block_size=0 must be a positive int"),
    ("process.clip_min", -0.1, "0 <= clip_min < clip_max <= 1"),
    ("process.clip_max", 1.5, "0 <= clip_min < clip_max <= 1"),
    ("process.clip_search_widths", (1.5,), r"widths must lie in \(0, 1\]"),
    ("model.time_conditioning", True, "model.time_conditioning must be False for bd3lm"),
    ("process.num_timesteps", 4, "process.num_timesteps must be 0 for bd3lm"),
])
def test_bad_bd3lm_configs_name_the_key(data_dir, key, value, message):
    with pytest.raises(ValueError, match=message):
        process.make_process(_bd3_config(data_dir, **{key: value}), vocab_size=VOCAB)


@pytest.mark.slow  # run by .ci/run after `make test` (make test-slow)
def test_train_searches_the_clip_checkpoints_it_and_evaluates(data_dir, tmp_path):
    config = _bd3_config(data_dir, total_steps=4, eval_every=2, checkpoint_every=2)
    final = trainer.train(config, tmp_path / "run")
    assert np.isfinite(final["eval/nll_nats_per_token"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    searched = [row for row in rows if "clip/min" in row]
    assert [row["step"] for row in searched] == [2, 4]
    exp = experiment.build(config)
    state, _ = checkpoint_lib.restore_from_workdir(
        tmp_path / "run", checkpoint_lib.abstract_like(exp.init_state()))
    np.testing.assert_allclose(state.process_state["clip"],
                               [searched[-1]["clip/min"], searched[-1]["clip/max"]])
    scored = trainer.evaluate_workdir(tmp_path / "run")
    np.testing.assert_allclose(scored["eval/nll_nats_per_token"],
                               final["eval/nll_nats_per_token"], rtol=1e-6)


def test_fine_tune_from_an_mdlm_run_starts_from_its_weights(data_dir, tmp_path):
    trainer.train(small_config(data_dir, mdlm, total_steps=2, checkpoint_every=2),
                  tmp_path / "mdlm")
    config = _bd3_config(data_dir, init_from=str(tmp_path / "mdlm"))
    exp = experiment.build(config)
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "bd3", keep=1)
    state = trainer._restore_or_init(exp, checkpointer, pipeline.train_iterator(
        config.data, exp.corpus, seed=0))
    checkpointer.close()
    source_exp = experiment.build(small_config(data_dir, mdlm))
    source, _ = checkpoint_lib.restore_from_workdir(
        tmp_path / "mdlm", checkpoint_lib.abstract_like(source_exp.init_state()))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                 jax.device_get(source.ema_params))
    assert int(state.step) == 0
    np.testing.assert_allclose(state.process_state["clip"], [0.0, 1.0])
