"""The bd3lm sampler on a tiny random block-causal DiT: the KV cache against a no-cache
reference, NFE accounting, the sliding window, the stop at EOS, errors and retracing."""

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import toy_networks
from test_sampling_entry import _save_run

from configs import bd3lm as bd3lm_config
from dlm import sampling
from dlm.diffusion import LogLinearSchedule, MaskedDiffusion, make_process
from dlm.diffusion.block import BlockDiffusion
from dlm.models import build_model, model_config
from dlm.models.kv_cache import KVCache
from dlm.runs import drawing, workdir
from dlm.sampling import block_unmask
from dlm.sampling.state import SamplerState

V = 24  # mask id 23
L = 16
EOS = 0


def _dit(layers: int, block_size: int = 4):
    """(module, perturbed params) of a tiny DiT with a block-causal mask."""
    config = model_config("micro", "dit")
    config.update(hidden=32, layers=layers, heads=2, kv_heads=2, dropout=0.0,
                  mask=f"block_causal:{block_size}")
    model = build_model(config, V)

    @jax.jit
    def init():
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))["params"]
        # The DiT's output layer starts at zero (uniform logits): perturb every weight, enough
        # for context-dependent logits, not so much that they become one-hot.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        leaves = [p + 0.12 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
        return jax.tree.unflatten(tree, leaves)

    return model, init()


def _network(model, block_size: int, context_len=None):
    vocab = sampling.Vocab(mask_id=V - 1, eos_id=EOS, pad_id=1)
    network = sampling.from_flax(model, BlockDiffusion(LogLinearSchedule(), V - 1, block_size),
                                 context_len=context_len)
    return dataclasses.replace(network, vocab=vocab)


@pytest.fixture(scope="module")
def dit():
    return _dit(layers=2)


def _draw(network, params, seed=0, batch=3, length=L, prompt=None, **options):
    return sampling.draw(sampling.get_sampler("bd3lm", **options), network, params,
                         jax.random.PRNGKey(seed), batch_size=batch, length=length,
                         prompt=prompt).output


@pytest.mark.parametrize("block_size,policy", [(4, "first_hitting"), (4, "mdlm"),
                                               (1, "first_hitting")])
def test_cached_equals_no_cache_reference(dit, block_size, policy):
    model, params = dit
    network = _network(model, block_size)
    prompt = [2, 3, 4, 5, 6, 7]  # ends in the middle of the second block of 4
    cached = _draw(network, params, prompt=prompt, policy=policy)
    reference = _draw(network, params, prompt=prompt, policy=policy, kv_cache=False)
    tokens = np.asarray(cached.tokens_BL)
    np.testing.assert_array_equal(tokens, reference.tokens_BL)
    np.testing.assert_array_equal(cached.commit_step_BL, reference.commit_step_BL)
    np.testing.assert_array_equal(tokens[:, :6], np.broadcast_to(prompt, (3, 6)))
    assert not np.any(tokens == V - 1) and np.all(np.asarray(cached.done_B))
    assert len({tuple(row) for row in tokens}) > 1  # the rows were sampled, not copied

    # Blocks fill left to right: every commit of a block comes before those of the next.
    steps_BN = np.asarray(cached.commit_step_BL)[:, 8:].reshape(3, -1, block_size)
    assert np.all(steps_BN.max(-1)[:, :-1] < steps_BN.min(-1)[:, 1:])

    # One call per committed block encoded (all before the last) and per step.
    encoded = L // block_size - 1
    assert int(reference.nfe) == int(reference.steps)
    assert int(cached.nfe) == int(cached.steps) + encoded
    if policy == "first_hitting":
        assert int(cached.steps) == L - 6  # one call per mask
        plain = _draw(network, params, seed=1, policy=policy)  # no prompt: same compilation
        assert int(plain.nfe) == L + encoded

        # Infilling (known positions that differ between rows) also matches the reference.
        rng = np.random.default_rng(0)
        template = rng.integers(0, V - 1, (3, L)).astype(np.int32)
        known = rng.random((3, L)) < 0.3
        outs = [sampling.draw(sampling.get_sampler("bd3lm", policy=policy, kv_cache=kv),
                              network, params, jax.random.PRNGKey(2), tokens_BL=template,
                              known_BL=known).output
                for kv in (True, False)]
        np.testing.assert_array_equal(outs[0].tokens_BL, outs[1].tokens_BL)
        np.testing.assert_array_equal(np.asarray(outs[0].tokens_BL)[known], template[known])


def test_dropped_oldest_shifts_the_cache():
    config = model_config("micro", "dit")
    config.update(hidden=8, layers=1, heads=2, kv_heads=2)
    cache = KVCache.init(config, 2, 6)
    k_BSKD = jnp.arange(2 * 6 * 2 * 4, dtype=jnp.float32).reshape(2, 6, 2, 4)
    cache = cache.replace(k=(k_BSKD,), v=(k_BSKD + 1,),
                          valid_BS=jnp.arange(6)[None].repeat(2, 0) < 5, length=jnp.int32(5))
    slid = cache.dropped_oldest(2)
    np.testing.assert_array_equal(slid.k[0][:, :4], k_BSKD[:, 2:])
    np.testing.assert_array_equal(slid.v[0][:, :4], k_BSKD[:, 2:] + 1)
    assert not np.any(slid.k[0][:, 4:])
    np.testing.assert_array_equal(slid.valid_BS, [[True] * 3 + [False] * 3] * 2)
    assert int(slid.length) == 3 and slid.max_len == 6


def test_sliding_window(dit):
    model, params = dit
    network = _network(model, 4)
    # The default window: the largest multiple of b that fits the training context with the
    # current block; the cache holds it and the current block, never more.
    rule = sampling.get_sampler("bd3lm").rule.for_network(_network(model, 4, context_len=10))
    assert rule.cache_window(_network(model, 4, context_len=10), L) == 4
    assert rule.cache_window(network, L) == L - 4
    state = SamplerState.start(jnp.zeros((2, L), jnp.int32), jnp.zeros((2, L), bool),
                               jax.random.PRNGKey(0), V - 1)
    kv = rule.init(_network(model, 4, context_len=10), params, state, 0).cache.kv
    assert kv.max_len == 8

    # A window of one block: each block sees only the one before it (a sample 4x longer
    # than the view); a window covering everything is the same as no window.
    short = _draw(network, params, window=4)
    full = _draw(network, params)
    assert not np.any(np.asarray(short.tokens_BL) == V - 1)
    assert int(short.nfe) == int(full.nfe) == L + 3
    assert np.any(np.asarray(short.tokens_BL) != np.asarray(full.tokens_BL))
    np.testing.assert_array_equal(_draw(network, params, window=L).tokens_BL,
                                  full.tokens_BL)


def test_slid_cache_matches_a_forward_over_the_window():
    # With one layer, keys depend only on their token and position, so a cache that slid
    # over blocks 0..2 with a window of 2 blocks holds exactly blocks 1..2; scoring block 3
    # against it must give the logits of a plain forward over blocks 1..3 placed at positions
    # 0..11 (RoPE only sees relative positions).
    model, params = _dit(layers=1)
    network = _network(model, 4)
    rule = sampling.get_sampler("bd3lm", window=8).rule.for_network(network)
    tokens_BL = jax.random.randint(jax.random.PRNGKey(3), (2, L), 0, V - 1)

    @jax.jit
    def slid_logits(params, tokens_BL):
        kv = network.init_cache_fn(2, 8 + 4)
        kv, encoded, nfe = rule.encode_before(network, params, tokens_BL, jnp.int32(3),
                                              (kv, jnp.int32(0), jnp.int32(0)))
        logits_BTV, _ = network.decode_fn(params, tokens_BL[:, 12:], kv,
                                          block_unmask.block_positions(jnp.int32(12), 2, 4))
        return logits_BTV, kv.length, encoded, nfe

    @jax.jit
    def forward_logits(params, tokens_BL):
        window_BLV = model.apply({"params": params}, tokens_BL[:, 4:], None, train=False)
        return window_BLV[:, 8:], network.forward_fn(params, tokens_BL)[:, 12:]

    logits_BTV, length, encoded, nfe = slid_logits(params, tokens_BL)
    assert (int(length), int(encoded), int(nfe)) == (8, 3, 3)
    window_BTV, prefix_BTV = forward_logits(params, tokens_BL)
    np.testing.assert_allclose(logits_BTV, window_BTV, atol=2e-4, rtol=1e-4)
    # ... and not those of a forward over the whole prefix (the window did cut it).
    assert not np.allclose(logits_BTV, prefix_BTV, atol=1e-3)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity
class _EosAfter:
    """A decode_fn making EOS likely at positions >= `position` and unlikely before (a bias
    of +-`bias` on its logit); counts its traces."""

    decode_fn: Any
    position: int
    bias: float = 30.0
    traces: list = dataclasses.field(default_factory=list)

    def __call__(self, params, tokens_BT, cache, positions_BT):
        self.traces.append(tokens_BT.shape)
        logits_BTV, cache = self.decode_fn(params, tokens_BT, cache, positions_BT)
        bias_BT = jnp.where(positions_BT >= self.position, self.bias, -self.bias)
        return logits_BTV.at[..., EOS].add(bias_BT), cache


def test_stop_at_eos_ends_samples_early(dit):
    model, params = dit
    network = _network(model, 4)
    network = dataclasses.replace(network, decode_fn=_EosAfter(network.decode_fn, 8))
    out = _draw(network, params, batch=4, policy="first_hitting", stop_at_eos=True)
    tokens = np.asarray(out.tokens_BL)
    for row in tokens:
        first = np.flatnonzero(row == EOS)[0]
        assert 8 <= first < 12  # in the third block, the first one where EOS is likely
        assert np.all(row[first:] == EOS) and not np.any(row[:first] == EOS)
    assert np.all(np.asarray(out.done_B))
    # The last block is never generated, nor is the third block encoded: at most 12 steps
    # and 2 encoding calls, where the whole length takes 16 and 3.
    assert int(out.nfe) <= 12 + 2
    assert np.all(np.isnan(np.asarray(out.confidence_BL)[:, 12:]))  # filled, not sampled


def test_one_trace_of_the_loop_body(dit):
    model, params = dit
    base = _network(model, 4)
    decode = _EosAfter(base.decode_fn, L)  # no bias inside the sequence: counts only
    network = dataclasses.replace(base, decode_fn=decode)
    traces = {}
    for steps in (2, 3):
        before = len(decode.traces)
        _draw(network, params, batch=2, policy="mdlm", steps=steps)
        traces[steps] = len(decode.traces) - before
    assert traces[2] == traces[3] == 2  # one encoding call and one scoring call
    before = len(decode.traces)
    _draw(network, params, seed=5, batch=2, policy="mdlm", steps=3, prompt=[1, 2, 3])
    assert len(decode.traces) == before  # new keys and prompts reuse the compiled loop


def test_clear_errors(dit):
    model, params = dit
    network = _network(model, 4)
    with pytest.raises(ValueError, match="length divisible by the block size 4, got "
                                         "length=14"):
        _draw(network, params, length=14)
    for window in (2, 6):
        with pytest.raises(ValueError, match=f"window={window} must be a positive multiple "
                                             "of the block size 4"):
            _draw(network, params, window=window)
    with pytest.raises(ValueError, match="trained with blocks of 4"):
        _draw(network, params, block_size=2)
    with pytest.raises(ValueError, match="window slides over the KV cache"):
        sampling.get_sampler("bd3lm", window=8, kv_cache=False)
    with pytest.raises(ValueError, match="policy 'first_hitting' takes no steps"):
        sampling.get_sampler("bd3lm", steps=4)
    with pytest.raises(ValueError, match="policy='nucleus'; allowed: first_hitting, mdlm"):
        sampling.get_sampler("bd3lm", policy="nucleus")

    joint = toy_networks.JointDenoiser(3, 4)
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), 3, 4))
    with pytest.raises(ValueError, match="sampler 'bd3lm' cannot sample a masked diffusion "
                                         "network: it needs a block network, this is a "
                                         "denoiser one; use mdlm"):
        sampling.draw(sampling.get_sampler("bd3lm"), joint.network(), log_joint,
                      jax.random.PRNGKey(0), batch_size=1, length=4)
    with pytest.raises(ValueError, match="sampler 'mdlm' cannot sample a block diffusion "
                                         "network: it needs a denoiser network, this is a "
                                         "block one; use bd3lm"):
        sampling.draw(sampling.get_sampler("mdlm"), network, params, jax.random.PRNGKey(0),
                      batch_size=1, length=L)
    config = model_config("micro", "dit")
    config.update(time_conditioning=True, mask="block_causal:4")
    with pytest.raises(ValueError, match="does not support a time-conditioned network"):
        sampling.from_flax(build_model(config, V), BlockDiffusion(LogLinearSchedule(), V - 1, 4))
    assert isinstance(sampling.from_flax(model, MaskedDiffusion(LogLinearSchedule(), V - 1)),
                      sampling.Denoiser)


def _run_files(name: str, **config) -> workdir.RunFiles:
    config = ml_collections.ConfigDict({"process": {"name": name}, **config})
    return workdir.RunFiles(pathlib.Path(name), config, None,
                            make_process(config, vocab_size=V))


def test_entry_point_checks():
    block_run, mdlm_run = _run_files("bd3lm", block_size=4), _run_files("mdlm")
    sampler = drawing.make_sampler("bd3lm", steps=3, overrides={"policy": "mdlm"})
    assert sampler.rule.inner.steps == 3
    drawing.check_compatible(sampler, block_run)
    with pytest.raises(ValueError, match="'bd3lm' cannot sample a masked diffusion run"):
        drawing.check_compatible(sampler, mdlm_run)
    with pytest.raises(ValueError, match="'llada' cannot sample a block diffusion run.*use "
                                         "bd3lm"):
        drawing.check_compatible(sampling.get_sampler("llada"), block_run)
    drawing.check_length(block_run, 32)
    drawing.check_length(mdlm_run, 30)
    with pytest.raises(ValueError, match="--length=30 must be a multiple of the run's block "
                                         "size 4"):
        drawing.check_length(block_run, 30)


def test_sample_to_file(tmp_path):
    workdir = _save_run(tmp_path / "run", bd3lm_config, "abcdefgh \n")  # seq_len 16
    out = tmp_path / "samples.jsonl"
    # Twice the training length (the window slides), cut short at EOS.
    summary = drawing.sample_to_file(workdir, "bd3lm", str(out), num_samples=2, length=32,
                                     prompt="ab", steps=2, batch_size=2,
                                     overrides={"policy": "mdlm", "stop_at_eos": True})
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and summary["sampler"] == "bd3lm"
    assert all(len(r["tokens"]) == 32 and r["text"].startswith("ab") for r in records)
