"""The sampler engine on a tiny random DiT: NFE accounting, conditioning, retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_networks

from dlm import sampling
from dlm.diffusion import LogLinearSchedule, MaskedDiffusion
from dlm.models import build_model, model_config
from dlm.sampling import engine

V = 24  # mask id 23
L = 16


@pytest.fixture(scope="module")
def dit():
    config = model_config("micro", "dit")
    config.update(hidden=32, layers=2, heads=2, kv_heads=2, dropout=0.0, mask=str(config.mask))
    model = build_model(config, V)

    @jax.jit
    def init():
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32),
                            jnp.ones((1,)))["params"]
        # The DiT's output layer starts at zero (uniform logits); perturb every weight so
        # the network has preferences to sample from.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
        return jax.tree.unflatten(tree, leaves)

    network = sampling.from_flax(model, MaskedDiffusion(LogLinearSchedule(), V - 1))
    return network, init()


def _draw(name, dit, seed=0, batch=4, prompt=None, **options):
    network, params = dit
    sampler = sampling.get_sampler(name, **options)
    return sampling.draw(sampler, network, params, jax.random.PRNGKey(seed),
                         batch_size=batch, length=L, prompt=prompt).output


def test_ddpm_cache_equals_mdlm_with_fewer_calls(dit):
    for seed in range(2):
        # 64 steps for 16 positions: many steps reveal nothing, so the cache can skip calls.
        plain = _draw("mdlm", dit, seed, batch=1, steps=64)
        cached = _draw("ddpm_cache", dit, seed, batch=1, steps=64)
        np.testing.assert_array_equal(plain.tokens_BL, cached.tokens_BL)
        np.testing.assert_array_equal(plain.commit_step_BL, cached.commit_step_BL)
        assert int(cached.nfe) < int(plain.nfe)
        assert int(cached.nfe) <= L + 1  # at most one call per distinct x_t


def test_ddpm_cache_counts_only_the_calls_it_makes():
    joint = toy_networks.JointDenoiser(3, 4)
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 4))
    outs = {}
    for name in ("mdlm", "ddpm_cache"):
        calls = joint.calls
        outs[name] = sampling.draw(sampling.get_sampler(name, steps=40), joint.network(),
                                   log_joint, jax.random.PRNGKey(3), batch_size=1,
                                   length=4).output
        assert int(outs[name].nfe) == joint.calls - calls  # the network's own count
    np.testing.assert_array_equal(outs["mdlm"].tokens_BL, outs["ddpm_cache"].tokens_BL)
    assert int(outs["ddpm_cache"].nfe) <= 5 < int(outs["mdlm"].nfe)


def test_mdlm_calls_once_per_step():
    joint = toy_networks.JointDenoiser(3, 3)
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 3))
    sampler = sampling.get_sampler("mdlm", steps=5)
    out = sampling.draw(sampler, joint.network(), log_joint, jax.random.PRNGKey(0),
                        batch_size=2, length=3).output
    assert int(out.nfe) == int(out.steps) == joint.calls


def test_threshold_one_commits_exactly_one_token_per_step(dit):
    out = _draw("fast_dllm", dit, threshold=1.0)
    assert int(out.nfe) == int(out.steps) == L
    for row in np.asarray(out.commit_step_BL):
        np.testing.assert_array_equal(np.sort(row), np.arange(L))


def test_first_hitting_makes_exactly_one_call_per_mask():
    joint = toy_networks.JointDenoiser(3, 5)
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 5))
    sampler = sampling.get_sampler("first_hitting")
    out = sampling.draw(sampler, joint.network(), log_joint, jax.random.PRNGKey(0),
                        batch_size=3, length=5, prompt=[2, 1]).output
    assert int(out.nfe) == joint.calls == 3  # 5 positions, 2 known
    np.testing.assert_array_equal(out.nfe_B, [3, 3, 3])


SETTINGS = [
    ("mdlm", {"steps": 8}), ("mdlm", {"steps": 4, "noise_removal": False}),
    ("ddpm_cache", {"steps": 8}), ("first_hitting", {}),
    ("llada", {"steps": 4, "block_length": 2}), ("llada", {"steps": 1, "block_length": 2}),
    ("llada", {"remasking": "random", "block_length": None, "temperature": 1.0}),
    ("dream", {"steps": 5}), ("dream", {"steps": 6, "alg": "margin"}),
    ("fast_dllm", {"threshold": 0.5}), ("fast_dllm", {"factor": 2.0, "block_length": 2}),
]


@pytest.mark.parametrize("name,options", SETTINGS)
def test_no_mask_left_and_prompt_kept(name, options):
    joint = toy_networks.JointDenoiser(3, 7)
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 7))
    prompt = [2, 1, 0]
    out = sampling.draw(sampling.get_sampler(name, **options), joint.network(), log_joint,
                        jax.random.PRNGKey(0), batch_size=4, length=7, prompt=prompt).output
    tokens = np.asarray(out.tokens_BL)
    assert not np.any(tokens == joint.mask_id)
    np.testing.assert_array_equal(tokens[:, :3], np.broadcast_to(prompt, (4, 3)))
    assert np.all(np.asarray(out.done_B))


@pytest.mark.parametrize("name", ["mdlm", "fast_dllm", "first_hitting"])
def test_infilling_keeps_known_positions(name):
    joint = toy_networks.JointDenoiser(3, 7)
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 7))
    rng = np.random.default_rng(0)
    template = rng.integers(0, 3, size=(5, 7)).astype(np.int32)
    known = rng.random((5, 7)) < 0.4
    out = sampling.draw(sampling.get_sampler(name), joint.network(), log_joint,
                        jax.random.PRNGKey(0), tokens_BL=template, known_BL=known).output
    tokens = np.asarray(out.tokens_BL)
    np.testing.assert_array_equal(tokens[known], template[known])
    assert not np.any(tokens == joint.mask_id)
    assert np.all(np.asarray(out.commit_step_BL)[known] == -1)


def test_semi_autoregressive_blocks_fill_left_to_right(dit):
    # 14 generated positions: blocks of 4, 4, 4, 2, and 14 // 4 = 3 steps for each block.
    out = _draw("llada", dit, prompt=[1, 2], steps=14, block_length=4)
    steps = np.asarray(out.commit_step_BL)[:, 2:]
    block_of_position = np.arange(14) // 4
    assert np.all(steps // 3 == block_of_position)
    assert int(out.steps) == 11  # the 2-position block is done after 2 of its 3 steps


def test_stop_at_eos_fills_the_rest():
    joint = toy_networks.JointDenoiser(3, 4)  # eos_id 0, pad_id 1
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(1), 3, 4))
    for fill, fill_id in (("eos", 0), ("pad", 1)):
        sampler = sampling.get_sampler("first_hitting", stop_at_eos=True, eos_fill=fill)
        out = sampling.draw(sampler, joint.network(), log_joint, jax.random.PRNGKey(0),
                            batch_size=64, length=4, prompt=[0]).output  # an EOS in the prompt
        tokens = np.asarray(out.tokens_BL)[:, 1:]
        for row in tokens:
            eos = np.flatnonzero(row == 0)
            if eos.size:
                assert np.all(row[eos[0] + 1:] == fill_id)
        assert np.any(tokens[:, :-1] == 0)  # the rule was exercised
        assert not np.any(tokens == 3)


def test_done_samples_stop_counting_calls():
    joint = toy_networks.JointDenoiser(3, 4)
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 4))
    known = np.array([[True] * 3 + [False], [False] * 4])
    out = sampling.draw(sampling.get_sampler("first_hitting"), joint.network(), log_joint,
                        jax.random.PRNGKey(0), tokens_BL=np.zeros((2, 4), np.int32),
                        known_BL=known).output
    np.testing.assert_array_equal(out.nfe_B, [1, 4])
    assert int(out.nfe) == 4


def _run(sampler, network, params, rng, batch_size, length, prompt=None):
    """engine.run itself (its jit cache is under test) on a prompt's inputs."""
    tokens_BL, known_BL, prompt_len = engine.prefix_inputs(prompt, batch_size, length,
                                                           network.vocab.mask_id)
    return engine.run(sampler, network, params, jnp.asarray(tokens_BL), jnp.asarray(known_BL),
                      rng, prefix_len=engine.static_prefix(sampler, prompt_len))


def test_one_compilation_and_no_retrace_across_steps():
    joint = toy_networks.JointDenoiser(3, 4)
    network = joint.network()
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 4))
    traces = {}
    for steps in (2, 64):
        before = joint.traces
        _run(sampling.get_sampler("mdlm", steps=steps), network, log_joint,
             jax.random.PRNGKey(0), batch_size=2, length=4)
        traces[steps] = joint.traces - before
    assert traces[2] == traces[64] <= 2  # the loop body is traced once, whatever the steps

    size = engine.run._cache_size()
    before = joint.traces
    for seed, prompt in ((1, None), (2, [0]), (3, [1, 2])):
        sampler = sampling.get_sampler("mdlm", steps=64)  # an equal config, a new object
        _run(sampler, network, log_joint, jax.random.PRNGKey(seed), batch_size=2, length=4,
             prompt=prompt)
    assert joint.traces == before  # new keys and prompts reuse the compiled loop
    assert engine.run._cache_size() == size
    _run(sampling.get_sampler("mdlm", steps=64), network, log_joint, jax.random.PRNGKey(0),
         batch_size=3, length=4)
    assert engine.run._cache_size() == size + 1  # a new batch size compiles once more


def test_draw_compiles_once_and_folds_the_key_per_batch():
    joint = toy_networks.JointDenoiser(3, 4)
    network = joint.network()
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 4))
    sampler = sampling.get_sampler("mdlm", steps=8)
    rng = jax.random.PRNGKey(7)
    drawn = sampling.draw(sampler, network, log_joint, rng, batch_size=2, length=4,
                          prompt=[1], num_batches=3)
    before = joint.traces
    for seed, prompt in ((1, None), (2, [0]), (3, [1, 2])):
        sampling.draw(sampling.get_sampler("mdlm", steps=8), network, log_joint,
                      jax.random.PRNGKey(seed), batch_size=2, length=4, prompt=prompt)
    assert joint.traces == before  # new keys and prompts reuse the compiled loop

    out = drawn.output
    assert isinstance(out.tokens_BL, np.ndarray) and out.tokens_BL.shape == (6, 4)
    assert out.nfe_B.shape == (6,) and len(drawn.seconds) == 3
    assert drawn.compile_seconds >= 0 and drawn.prompt_len == 1
    np.testing.assert_array_equal(drawn.known_BL, [[True, False, False, False]] * 2)
    nfe = 0
    for index in range(3):  # batch i is one draw under fold_in(rng, i)
        one = _run(sampler, network, log_joint, jax.random.fold_in(rng, index), batch_size=2,
                   length=4, prompt=[1])
        np.testing.assert_array_equal(out.tokens_BL[2 * index:2 * index + 2], one.tokens_BL)
        np.testing.assert_array_equal(out.nfe_B[2 * index:2 * index + 2], one.nfe_B)
        nfe += int(one.nfe)
    assert int(out.nfe) == nfe  # summed over the batches

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    fetched = []
    placed = sampling.draw(sampler, network, log_joint, rng, batch_size=2, length=4,
                           prompt=[1], sharding=sharding,
                           fetch=lambda x: fetched.append(1) or jax.device_get(x))
    np.testing.assert_array_equal(placed.output.tokens_BL, out.tokens_BL[:2])
    assert fetched == [1]


def test_draw_input_errors():
    joint = toy_networks.JointDenoiser(3, 4)
    network, log_joint = joint.network(), jnp.zeros((81,))
    sampler, key = sampling.get_sampler("mdlm"), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="needs both tokens_BL and known_BL"):
        sampling.draw(sampler, network, log_joint, key, tokens_BL=np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="batch_size=3, but tokens_BL has shape"):
        sampling.draw(sampler, network, log_joint, key, batch_size=3,
                      tokens_BL=np.zeros((2, 4), np.int32), known_BL=np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="needs batch_size and length"):
        sampling.draw(sampler, network, log_joint, key, batch_size=2)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown sampler 'nope'; known samplers: mdlm"):
        sampling.get_sampler("nope")
    with pytest.raises(ValueError, match="has no option 'treshold'.*threshold"):
        sampling.get_sampler("fast_dllm", treshold=0.9)
    with pytest.raises(ValueError, match="threshold"):
        sampling.get_sampler("fast_dllm", threshold=1.5)
    with pytest.raises(ValueError, match="remasking"):
        sampling.get_sampler("llada", remasking="lowest")
    assert sampling.get_sampler("llada", steps=8) == sampling.get_sampler("llada", steps=8)
    assert hash(sampling.get_sampler("dream")) == hash(sampling.get_sampler("dream"))


def test_prompt_longer_than_length_is_an_error(dit):
    with pytest.raises(ValueError, match="the prompt has 20 tokens, more than length=16"):
        _draw("mdlm", dit, prompt=list(range(20)))
