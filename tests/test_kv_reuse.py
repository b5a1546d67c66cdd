"""Approximate KV caches (`dlm.sampling.kv_reuse`) against the uncached samplers.

References: the uncached sampler under the same key (a refresh at every step must equal it
token for token), the full forward (a partial call right after a refresh must equal it),
bd3lm's exact block cache (the prefix cache of a block-causal network is exact), each row
decoded alone (batching must not change an answer), and the closed forms of the
token-forward counts.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import runs, sampling
from dlm.diffusion import LogLinearSchedule, MaskedDiffusion
from dlm.diffusion.block import BlockDiffusion
from dlm.evaluation import answers
from dlm.models import build_model, model_config
from dlm.models.kv_cache import KVCache
from dlm.sampling import kv_reuse
from experiments import pretrained_benchmarks

V = 24  # mask id 23
L = 32
POLICIES = ("prefix", "dual", "dkv", "freecache", "dinfer")


def _perturbed(model, length, scale=0.3):
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32),
                        jnp.ones((1,), jnp.float32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


def _dit(mask="full", time_conditioning=False, scale=0.3):
    config = model_config("micro", "dit")
    config.update(hidden=32, layers=2, heads=2, kv_heads=2, dropout=0.0, mask=mask,
                  time_conditioning=time_conditioning)
    model = build_model(config, V)
    return model, _perturbed(model, L, scale)


@pytest.fixture(scope="module")
def dit():
    model, params = _dit()
    vocab = sampling.Vocab(mask_id=V - 1, eos_id=0, pad_id=1)
    network = sampling.from_flax(model, MaskedDiffusion(LogLinearSchedule(), V - 1))
    return dataclasses.replace(network, vocab=vocab), params


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    """An imported LLaDA-layout folder (RMSNorm, SwiGLU, RoPE base 5e5, full attention)."""
    folder = tmp_path_factory.mktemp("llada")
    pretrained_benchmarks.write_random_folder(folder, "llada", 64, 2, vocab=48, shards=1)
    run = runs.load_run(folder)
    return run.network, run.params


def _draw(network, params, name="llada", seed=0, batch=2, length=L, prompt=(1, 2, 3, 4, 5),
          **options):
    return sampling.draw(sampling.get_sampler(name, **options), network, params,
                         jax.random.PRNGKey(seed), batch_size=batch, length=length,
                         prompt=np.asarray(prompt, np.int32)).output


LLADA = ("llada", {"block_length": 8, "steps": 16, "temperature": 1.0})
FAST_DLLM = ("fast_dllm", {"block_length": 8, "threshold": 0.7})
# Every policy under LLaDA's sampling (temperature 1, so the draws' noise must line up too)
# on a DiT; a selection on the imported LLaDA and under Fast-dLLM's threshold rule.
CASES = ([("dit", *LLADA, cache) for cache in POLICIES]
         + [("dit", *FAST_DLLM, "dual"), ("llada", *LLADA, "dual"), ("llada", *LLADA, "dkv"),
            ("llada", *LLADA, "freecache"), ("llada", *FAST_DLLM, "prefix")])


@pytest.mark.parametrize("which,name,options,cache", CASES)
def test_refresh_every_step_equals_the_uncached_sampler(request, which, name, options, cache):
    network, params = request.getfixturevalue(which)
    reference = _draw(network, params, name, **options)
    cached = _draw(network, params, name, cache=cache, cache_every=1, **options)
    np.testing.assert_array_equal(cached.tokens_BL, reference.tokens_BL)
    np.testing.assert_array_equal(cached.commit_step_BL, reference.commit_step_BL)
    np.testing.assert_array_equal(cached.token_forwards_B, reference.token_forwards_B)
    assert np.all(np.asarray(cached.done_B))
    # Without refreshes the cache is an approximation: no more positions run, fewer once a
    # block takes several steps (with few steps, the early blocks of the policies that
    # recompute what follows the block need all 32, the smallest size holding it), and the
    # samples are still complete.
    approx = _draw(network, params, name, cache=cache, cache_every=0, **options)
    approx_B, reference_B = (np.asarray(o.token_forwards_B) for o in (approx, reference))
    assert np.all(approx_B <= reference_B)
    if cache in ("dual", "dinfer") or name == "llada":
        assert np.all(approx_B < reference_B)
    assert not np.any(np.asarray(approx.tokens_BL) == network.vocab.mask_id)


def test_the_partial_call_after_a_refresh_is_exact_then_drifts(dit):
    network, params = dit
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, L), 0, V - 1)
    t_B = jnp.ones((2,), jnp.float32)
    full = network.apply_fn(params, tokens, t_B)
    positions = jnp.broadcast_to(jnp.arange(L), (2, L))
    refreshed, kv = network.partial_fn(params, tokens, positions, network.init_cache_fn(2, L),
                                       t_B)
    np.testing.assert_allclose(refreshed, full, atol=1e-6)
    idx = jnp.array([[8, 9, 10, 11], [0, 5, 17, 30]])  # a block, and scattered positions
    gather = jax.vmap(lambda x, i: x[i])
    logits, _ = network.partial_fn(params, gather(tokens, idx), idx, kv, t_B)
    np.testing.assert_allclose(logits, gather(full, idx), rtol=1e-5, atol=1e-5)

    # Once tokens outside the query set change, the cached keys/values are stale: the error
    # is measured, not assumed (it is what the refresh interval trades against speed).
    changed = tokens.at[:, 20:24].set(7)
    logits, _ = network.partial_fn(params, gather(changed, idx), idx, kv, t_B)
    error = float(jnp.max(jnp.abs(logits - gather(network.apply_fn(params, changed, t_B),
                                                   idx))))
    assert np.isfinite(error) and error > 1e-3
    # Positions computed only to fill the query set leave the cache as it was.
    _, unwritten = network.partial_fn(params, gather(changed, idx), idx, kv, t_B,
                                      jnp.zeros(idx.shape, bool))
    for before, after in zip(kv.k, unwritten.k):
        np.testing.assert_array_equal(before, after)


def test_prefix_cache_of_a_block_causal_network_is_bd3lms_exact_cache():
    model, params = _dit(mask="block_causal:4")
    denoiser = sampling.from_flax(model, MaskedDiffusion(LogLinearSchedule(), V - 1))
    block = sampling.from_flax(model, BlockDiffusion(LogLinearSchedule(), V - 1, 4))
    prompt = (1, 2, 3, 4, 5, 6, 7, 8)  # two whole blocks, so the blocks line up
    steps = 2  # per block of 4
    bd3lm = _draw(block, params, "bd3lm", policy="fixed_count", steps=steps, temperature=0.0,
                  prompt=prompt)
    prefix = _draw(denoiser, params, "llada", block_length=4, steps=steps * (L - 8) // 4,
                   cache="prefix", prompt=prompt)
    np.testing.assert_array_equal(prefix.tokens_BL, bd3lm.tokens_BL)
    assert len({tuple(r) for r in np.asarray(prefix.tokens_BL)[:, 8:].tolist()}) >= 1
    uncached = _draw(denoiser, params, "llada", block_length=4, steps=steps * (L - 8) // 4,
                     prompt=prompt)
    np.testing.assert_array_equal(uncached.tokens_BL, bd3lm.tokens_BL)


@pytest.mark.parametrize("cache", ("none", *POLICIES))
def test_batched_rows_of_different_prompt_lengths_equal_each_row_alone(dit, cache):
    network, params = dit
    layout = answers.Layout(length=L, max_new_tokens=20, fill_id=0, mask_id=V - 1)
    prompts = [np.array([1, 5, 6], np.int32), np.array([1, 7, 8, 9, 10, 11, 12], np.int32),
               np.array([1, 13, 14, 15, 16], np.int32)]
    sampler = sampling.get_sampler("fast_dllm", block_length=8, threshold=0.5,
                                   cache=cache, cache_every=0 if cache != "none" else None)
    tokens, known = layout.rows(prompts)
    batch = sampling.draw(sampler, network, params, jax.random.PRNGKey(0), tokens_BL=tokens,
                          known_BL=known).output
    for row in range(len(prompts)):
        alone = sampling.draw(sampler, network, params, jax.random.PRNGKey(0),
                              tokens_BL=tokens[row:row + 1], known_BL=known[row:row + 1]).output
        np.testing.assert_array_equal(batch.tokens_BL[row], alone.tokens_BL[0])
        assert int(batch.token_forwards_B[row]) == int(alone.token_forwards_B[0])


def _blocks(prompt_len, length, block):
    starts = list(range(prompt_len, length, block))
    return starts, [min(block, length - s) for s in starts]


def test_token_forwards_follow_their_closed_forms(dit):
    network, params = dit
    block, per_block = 8, 4
    starts, sizes = _blocks(5, L, block)  # blocks of 8, 8, 8, 3
    steps_B = [min(per_block, n) for n in sizes]  # a block of 3 takes 3 steps
    options = {"block_length": block, "steps": per_block * len(starts)}

    def forwards(**extra):
        out = _draw(network, params, **options, **extra)
        assert int(out.steps) == sum(steps_B)
        return np.asarray(out.token_forwards_B).tolist()

    # No cache: L per call; dual: one full pass per block, then the block per step.
    assert forwards() == [L * sum(steps_B)] * 2
    assert forwards(cache="dual", cache_every=0) == [
        len(starts) * L + (sum(steps_B) - len(starts)) * block] * 2
    # dInfer: the block and 2 positions on each side.
    assert forwards(cache="dinfer", cache_every=0, cache_vicinity=2) == [
        len(starts) * L + (sum(steps_B) - len(starts)) * (block + 4)] * 2
    # Prefix: the block and all after it, in the smallest of 8, 16, 32 that holds them.
    bucket = [next(n for n in (8, 16, 32) if n >= max(L - s, block)) for s in starts]
    assert forwards(cache="prefix", cache_every=0) == [
        sum(L + (k - 1) * n for k, n in zip(steps_B, bucket))] * 2
    # Refreshes every 2 steps: blocks of 4 steps refresh twice.
    assert forwards(cache="dual", cache_every=2) == [
        sum(L * -(-k // 2) + (k - -(-k // 2)) * block for k in steps_B)] * 2


def test_other_samplers_count_their_token_forwards(dit):
    network, params = dit
    out = _draw(network, params, "mdlm", steps=8)
    assert np.asarray(out.token_forwards_B).tolist() == [L * int(out.nfe)] * 2
    model, bparams = _dit(mask="block_causal:4")
    block = sampling.from_flax(model, BlockDiffusion(LogLinearSchedule(), V - 1, 4))
    out = _draw(block, bparams, "bd3lm", prompt=(1, 2, 3, 4, 5, 6, 7, 8))
    assert np.asarray(out.token_forwards_B).tolist() == [4 * int(out.nfe)] * 2


@dataclasses.dataclass(frozen=True)
class _CountingPartial:
    inner: object
    traces: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def __call__(self, params, tokens_BN, positions_BN, cache, t_B, write_BN=None):
        self.traces.append(tokens_BN.shape)
        return self.inner(params, tokens_BN, positions_BN, cache, t_B, write_BN)


def test_one_trace_of_the_loop_body_regardless_of_the_number_of_steps(dit):
    network, params = dit
    counting = _CountingPartial(network.partial_fn)
    network = dataclasses.replace(network, partial_fn=counting)
    for steps in (8, 16, 24):
        before = len(counting.traces)
        _draw(network, params, block_length=8, steps=steps, cache="prefix", cache_every=0)
        # One partial call per query-set size (8, 16, and 32 = L, which is also the refresh),
        # each traced once.
        assert sorted(counting.traces[before:]) == [(2, 8), (2, 16), (2, 32)]
    before = len(counting.traces)
    _draw(network, params, seed=5, prompt=(1, 2, 3), block_length=8, steps=8, cache="prefix",
          cache_every=0)
    assert len(counting.traces) == before  # new keys and prompts reuse the compiled loop


def test_time_conditioned_networks_decode_with_a_cache():
    model, params = _dit(time_conditioning=True)
    network = sampling.from_flax(model, MaskedDiffusion(LogLinearSchedule(), V - 1))
    reference = _draw(network, params, block_length=8, steps=16)
    cached = _draw(network, params, block_length=8, steps=16, cache="dual", cache_every=1)
    np.testing.assert_array_equal(cached.tokens_BL, reference.tokens_BL)


def test_bad_cache_options_are_named(dit):
    network, params = dit
    with pytest.raises(ValueError, match="cache='flash'; allowed: none, prefix"):
        sampling.get_sampler("llada", cache="flash")
    with pytest.raises(ValueError, match="set block_length"):
        sampling.get_sampler("fast_dllm", cache="dual")
    with pytest.raises(ValueError, match="cache_every=-1"):
        sampling.get_sampler("llada", cache="dual", cache_every=-1)
    with pytest.raises(ValueError, match="variant 'lazy'"):
        sampling.get_sampler("llada", cache="dkv", cache_variant="lazy")
    shifted = dataclasses.replace(network, partial_fn=None, init_cache_fn=None)
    with pytest.raises(ValueError, match="no partial forward"):
        _draw(shifted, params, block_length=8, cache="dual")
    assert kv_reuse.by_name("none") is None
    assert kv_reuse.by_name("dkv", variant="greedy", vicinity=3) == kv_reuse.DKV(
        variant="greedy", vicinity=3)


def test_kv_cache_init_uses_the_head_dim_option():
    config = model_config("micro", "transformer")
    config.update(hidden=32, heads=2, kv_heads=2, head_dim=8, layers=1)
    assert KVCache.init(config, 1, 4).k[0].shape == (1, 4, 2, 8)


@pytest.fixture(scope="module")
def block_network():
    model, params = _dit(mask="block_causal:8")
    return sampling.from_flax(model, BlockDiffusion(LogLinearSchedule(), V - 1, 8)), params


@pytest.mark.parametrize("policy", ["threshold", "fixed_count"])
def test_fast_dllm_v2_sub_block_cache(block_network, policy):
    network, params = block_network
    prompt = tuple(range(1, 9))  # one whole block of 8

    def draw(batch=2, **options):
        return _draw(network, params, "bd3lm", policy=policy, temperature=0.0, prompt=prompt,
                     batch=batch, **options)

    # Sub-blocks as big as the block: the sub-block call recomputes (and rewrites) the
    # whole block against the exact cache of committed blocks, so nothing is approximate.
    exact = draw()
    whole = draw(sub_block=8, cache="dual")
    np.testing.assert_array_equal(whole.tokens_BL, exact.tokens_BL)
    np.testing.assert_array_equal(whole.token_forwards_B, exact.token_forwards_B)

    # Sub-blocks of 4 (one row, so that no other row's sub-block triggers a refresh): per
    # generated block one call encodes the block before it, one call runs the whole block
    # when each of its 2 sub-blocks starts, and every other step runs the 4 positions.
    cached = draw(batch=1, sub_block=4, cache="dual")
    reference = draw(batch=1, sub_block=4)
    assert not np.any(np.asarray(cached.tokens_BL) == V - 1)
    blocks, steps = L // 8 - 1, int(cached.steps)
    assert int(cached.token_forwards_B[0]) == 8 * blocks + 8 * 2 * blocks + 4 * (
        steps - 2 * blocks)
    assert int(reference.token_forwards_B[0]) == 8 * (blocks + int(reference.steps))
    assert int(cached.token_forwards_B[0]) < int(reference.token_forwards_B[0])
    # Decoding sub-blocks changes nothing about the exact paths: with and without the
    # committed blocks' cache they agree.
    without_kv = draw(batch=1, sub_block=4, kv_cache=False)
    np.testing.assert_array_equal(without_kv.tokens_BL, reference.tokens_BL)


def test_sub_blocks_share_each_blocks_steps_in_every_block(block_network):
    """Two steps per block of 8 in sub-blocks of 4: each sub-block gets one step, so it is
    committed whole at once, in every block (the inner rule counts steps, its own and its
    commits', from the block's start)."""
    network, params = block_network
    out = _draw(network, params, "bd3lm", policy="fixed_count", steps=2, sub_block=4,
                temperature=0.0, prompt=tuple(range(1, 9)), batch=1)
    assert not np.any(np.asarray(out.tokens_BL) == V - 1)
    commit_steps = np.asarray(out.commit_step_BL[0, 8:]).reshape(-1, 4)
    assert np.all(commit_steps == commit_steps[:, :1])  # one step per sub-block
    assert int(out.steps) == 2 * (L // 8 - 1)


def test_fast_dllm_v2_options_are_checked(block_network):
    with pytest.raises(ValueError, match="needs sub_block and kv_cache=True"):
        sampling.get_sampler("bd3lm", cache="dual")
    with pytest.raises(ValueError, match="allowed for bd3lm: none, dual"):
        sampling.get_sampler("bd3lm", cache="prefix", sub_block=4)


def _rules():
    from dlm.sampling import categorical, scores, select, times
    from dlm.sampling.unmask import Unmask

    proposal = categorical.Categorical()
    return {
        "first hitting": Unmask(select=select.FixedCount(1), score=scores.Random(),
                                time=times.FirstHitting(), block_length=8, proposal=proposal),
        "mdlm grid": Unmask(select=select.Reveal(), time=times.GridTime(), steps=16,
                            final_greedy=True, block_length=8, proposal=proposal),
        "factor": sampling.get_sampler("fast_dllm", factor=1.0, block_length=8).rule,
        "entropy order": sampling.get_sampler("dream", block_length=8, steps=16).rule,
    }


@pytest.mark.slow
@pytest.mark.parametrize("rule_name", ["first hitting", "mdlm grid", "factor", "entropy order"])
def test_every_commit_rule_composes_with_a_cache(dit, rule_name):
    network, params = dit
    rule = _rules()[rule_name]
    prompt = np.asarray([1, 2, 3, 4, 5], np.int32)

    def draw(kv):
        sampler = sampling.Sampler(rule_name, dataclasses.replace(rule, kv=kv))
        return sampling.draw(sampler, network, params, jax.random.PRNGKey(0), batch_size=2,
                             length=L, prompt=prompt).output

    reference = draw(None)
    np.testing.assert_array_equal(draw(kv_reuse.Dual(every=1)).tokens_BL, reference.tokens_BL)
    approx = draw(kv_reuse.Dual())
    assert np.all(np.asarray(approx.token_forwards_B) < np.asarray(reference.token_forwards_B))
