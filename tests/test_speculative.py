"""DiffuSpec (`dlm.sampling.speculative`) against the `ar` sampler: greedy token for token
on tiny random networks and on a toy whose drafts are right, the AR model's exact joint when
sampling (and two wrong acceptance rules that the same check rejects), CPS against a brute
force of its criterion, ADL's direction, and the option checks."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_networks

from dlm import sampling
from dlm.diffusion import LogLinearSchedule, MaskedDiffusion
from dlm.diffusion.autoregressive import Autoregressive
from dlm.models import build_model, model_config
from dlm.sampling.networks import DraftedCausalLM
from dlm.sampling.speculative import AdaptiveDraftLength, CausalPathSearch, DiffuSpec

V = 24  # mask id 23
L = 20


def _perturbed(params, seed, scale=0.3):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


def _micro(name):
    config = model_config("micro", name)
    config.update(hidden=32, layers=2, heads=2, kv_heads=2, dropout=0.0)
    return build_model(config, V)


@dataclasses.dataclass(frozen=True)
class _CausalDrafter:
    """A causal LM's full forward as a drafter, its logits moved to the positions they
    predict: the first draft is the LM's greedy token, the later ones read masks."""

    module: object

    def __call__(self, params, tokens_BL, t_B):
        logits_BLV = self.module.apply({"params": params}, tokens_BL, train=False)
        return jnp.concatenate([jnp.zeros_like(logits_BLV[:, :1]), logits_BLV[:, :-1]], 1)


@pytest.fixture(scope="module")
def random_pair():
    """A random causal transformer (target) and a random DiT (drafter) on one vocabulary,
    and the target drafting for itself (`_CausalDrafter`)."""
    vocab = sampling.Vocab(V - 1, eos_id=0, pad_id=1)
    causal, dit = _micro("transformer"), _micro("dit")
    target_params = _perturbed(jax.jit(causal.init)(jax.random.PRNGKey(0),
                                                    jnp.zeros((1, L), jnp.int32))["params"], 1)
    drafter_params = _perturbed(jax.jit(dit.init)(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, L), jnp.int32),
                                                  jnp.ones((1,), jnp.float32))["params"], 2)
    target = dataclasses.replace(sampling.from_flax(causal, Autoregressive()), vocab=vocab)
    drafter = dataclasses.replace(
        sampling.from_flax(dit, MaskedDiffusion(LogLinearSchedule(), V - 1)), vocab=vocab)
    itself = DraftedCausalLM(sampling.Denoiser(_CausalDrafter(causal), vocab), target)
    return (DraftedCausalLM(drafter, target),
            {"drafter": drafter_params, "target": target_params}, itself)


def _draw(sampler, network, params, tokens, known, seed=0):
    return sampling.draw(sampler, network, params, jax.random.PRNGKey(seed), tokens_BL=tokens,
                         known_BL=known).output


def _target_calls(out, prompt_len):
    """The target's calls of a diffuspec draw: the prefill, then one per step."""
    return int(prompt_len > 1) + int(out.steps)


def test_greedy_equals_ar_greedy_row_by_row(random_pair):
    _, params, network = random_pair  # the first draft is always right, the others rarely
    params = {"drafter": params["target"], "target": params["target"]}
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, V - 1, (3, L)).astype(np.int32)
    known = np.zeros((3, L), bool)
    known[:, :3] = True  # shared prompt; row 1's is longer, rows 0 and 2 infill
    known[1, :6] = True
    known[0, 10:12] = known[2, 15:18] = True
    spec = sampling.get_sampler("diffuspec", temperature=0.0, draft_len=4)
    greedy = _draw(sampling.get_sampler("ar", temperature=0.0), network.target,
                   params["target"], tokens, known)
    batch = _draw(spec, network, params, tokens, known)
    np.testing.assert_array_equal(batch.tokens_BL, greedy.tokens_BL)
    np.testing.assert_array_equal(np.asarray(batch.tokens_BL)[known], tokens[known])
    assert _target_calls(batch, 3) <= int(greedy.nfe) // 2 + 1  # 2 tokens a call or more
    assert int(batch.nfe) == 1 + 2 * int(batch.steps)  # prefill, then drafter + target
    assert np.asarray(batch.token_forwards_B).tolist() == [2 + (L + 5) * int(batch.steps)] * 3
    for row in range(3):
        alone = _draw(spec, network, params, tokens[row:row + 1], known[row:row + 1])
        np.testing.assert_array_equal(batch.tokens_BL[row], alone.tokens_BL[0])


def test_greedy_ending_at_eos_equals_ar(random_pair):
    network, params, _ = random_pair
    prompt = np.array([2, 3, 4], np.int32)

    def draw(name, net, p, **options):
        sampler = sampling.get_sampler(name, temperature=0.0, stop_at_eos=True, **options)
        return sampling.draw(sampler, net, p, jax.random.PRNGKey(0), batch_size=2, length=L,
                             prompt=prompt).output.tokens_BL

    np.testing.assert_array_equal(draw("diffuspec", network, params, adaptive=False),
                                  draw("ar", network.target, params["target"]))


@pytest.mark.parametrize("cache", ["dual", pytest.param("prefix", marks=pytest.mark.slow),
                                   pytest.param("freecache", marks=pytest.mark.slow)])
def test_a_cached_drafter_changes_the_drafts_not_the_output(random_pair, cache):
    network, params, _ = random_pair  # the DiT drafter, which has a partial forward
    prompt = np.array([[2, 3, 4, 5], [6, 7, 8, 9]], np.int32)

    def draw(name, net, p, **options):
        return sampling.draw(sampling.get_sampler(name, temperature=0.0, **options), net, p,
                             jax.random.PRNGKey(0), batch_size=2, length=L,
                             prompt=prompt).output

    greedy = draw("ar", network.target, params["target"])
    plain = draw("diffuspec", network, params, draft_len=4, adaptive=False)
    cached = draw("diffuspec", network, params, draft_len=4, adaptive=False, cache=cache)
    np.testing.assert_array_equal(cached.tokens_BL, greedy.tokens_BL)
    np.testing.assert_array_equal(plain.tokens_BL, greedy.tokens_BL)
    # The drafter runs its window of 4 between refreshes, not all L positions.
    assert np.all(cached.token_forwards_B < plain.token_forwards_B)


# A toy pair whose drafts are right: the target counts up (next = fed + 1 mod 16) and the
# drafter continues the count from the last unmasked token, wrong (one too high) wherever
# the count is a multiple of `wrong_every`: rows starting elsewhere accept different runs.
COUNT = 16


@dataclasses.dataclass(frozen=True)
class _CountingLM:
    def __call__(self, params, tokens_BT, cache):
        logits = 10.0 * jax.nn.one_hot((tokens_BT + 1) % COUNT, COUNT + 1)
        return logits, cache.replace(length=cache.length + tokens_BT.shape[1])


@dataclasses.dataclass(frozen=True)
class _InitCache:
    def __call__(self, batch, max_len):
        return toy_networks.PrefixCache(jnp.zeros((batch, 0), jnp.int32),
                                        jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class _CountingDrafter:
    wrong_every: int = 0

    def __call__(self, params, tokens_BL, t_B):
        pos_L = jnp.arange(tokens_BL.shape[1])
        seen_BL = tokens_BL != COUNT
        last_BL = jax.lax.cummax(jnp.where(seen_BL, pos_L, -1), axis=1)
        last_token_BL = jnp.take_along_axis(tokens_BL, jnp.maximum(last_BL, 0), axis=1)
        guess_BL = last_token_BL + pos_L - last_BL
        if self.wrong_every:
            guess_BL = guess_BL + (guess_BL % COUNT % self.wrong_every == 0)
        return 10.0 * jax.nn.one_hot(guess_BL % COUNT, COUNT + 1)


def _counting_pair(wrong_every=0):
    vocab = sampling.Vocab(mask_id=COUNT)
    return DraftedCausalLM(sampling.Denoiser(_CountingDrafter(wrong_every), vocab),
                           sampling.CausalLM(_CountingLM(), _InitCache(), vocab))


@pytest.mark.parametrize("wrong_every,adaptive,most_calls", [
    (0, True, 5),  # every draft right: K + 1 = 9 tokens a call
    (5, False, 20),  # wrong at counts 0, 5, 10, 15, at other positions in each row
])
def test_right_drafts_commit_many_tokens_per_call(wrong_every, adaptive, most_calls):
    network = _counting_pair(wrong_every)
    prompt = np.array([[3], [9]], np.int32)
    params = {"drafter": {}, "target": {}}
    ar = sampling.draw(sampling.get_sampler("ar", temperature=0.0), network.target, {},
                       jax.random.PRNGKey(0), batch_size=2, length=40, prompt=prompt).output
    spec = sampling.draw(sampling.get_sampler("diffuspec", temperature=0.0, adaptive=adaptive),
                         network, params, jax.random.PRNGKey(0), batch_size=2, length=40,
                         prompt=prompt).output
    np.testing.assert_array_equal(spec.tokens_BL, ar.tokens_BL)
    assert int(ar.nfe) == 39
    assert _target_calls(spec, 1) <= most_calls
    # Sampling from a near-deterministic target: nearly every draft is accepted too.
    sampled = sampling.draw(sampling.get_sampler("diffuspec", adaptive=adaptive), network, params,
                            jax.random.PRNGKey(0), batch_size=2, length=40,
                            prompt=prompt).output
    assert _target_calls(sampled, 1) <= most_calls + 2


@dataclasses.dataclass(frozen=True)
class _SoftCountingLM:
    """The counting target, unsure: the next count gets ~0.28, one above it ~0.14."""

    def __call__(self, params, tokens_BT, cache):
        logits = (2.0 * jax.nn.one_hot((tokens_BT + 1) % COUNT, COUNT + 1)
                  + 1.3 * jax.nn.one_hot((tokens_BT + 2) % COUNT, COUNT + 1))
        return logits, cache.replace(length=cache.length + tokens_BT.shape[1])


def test_ar_guided_keeps_the_tokens_its_judge_finds_probable():
    vocab = sampling.Vocab(mask_id=COUNT)
    judge = sampling.CausalLM(_SoftCountingLM(), _InitCache(), vocab)
    network = DraftedCausalLM(sampling.Denoiser(_CountingDrafter(5), vocab), judge)
    prompt = np.array([[3], [9]], np.int32)
    params = {"drafter": {}, "target": {}}

    def draw(name, net, p, **options):
        return sampling.draw(sampling.get_sampler(name, **options), net, p,
                             jax.random.PRNGKey(0), batch_size=2, length=40,
                             prompt=prompt).output

    greedy = draw("ar", judge, {}, temperature=0.0)
    strict = draw("ar_guided", network, params, threshold=1.0)
    np.testing.assert_array_equal(strict.tokens_BL, greedy.tokens_BL)  # the judge's output
    loose = draw("ar_guided", network, params, threshold=0.1)
    np.testing.assert_array_equal(loose.tokens_BL[:, 0], prompt[:, 0])
    # The drafter's off-by-one tokens (probability ~0.14 >= 0.1) are kept: its own text.
    tokens = np.asarray(loose.tokens_BL)
    steps = (tokens[:, 1:] - tokens[:, :-1]) % COUNT
    assert set(np.unique(steps)) == {1, 2} and not np.array_equal(tokens, greedy.tokens_BL)
    assert _target_calls(loose, 1) < _target_calls(strict, 1)
    with pytest.raises(ValueError, match="threshold=0"):
        sampling.get_sampler("ar_guided", threshold=0.0)
    with pytest.raises(ValueError, match="decodes greedily"):
        sampling.get_sampler("ar_guided", temperature=1.0)


# --- Exactness when sampling: the toy joint of test_sampling_exact (3 tokens, a prompt
# token and 3 generated positions), with a target whose cache may outgrow the joint.

VOCAB, LENGTH, N = 3, 4, 20_000


class _JointLM:
    """p(x_{i+1} | x_<=i) from a joint over LENGTH positions, through a PrefixCache of any
    size (positions past the joint's are fed but never read). Hashed by identity."""

    def __init__(self):
        self.seqs_KL = toy_networks.all_sequences(VOCAB, LENGTH)

    def init_cache(self, batch, max_len):
        return toy_networks.PrefixCache(jnp.zeros((batch, max_len), jnp.int32),
                                        jnp.zeros((), jnp.int32))

    def decode(self, log_joint_K, tokens_BT, cache):
        tokens_BS = jax.lax.dynamic_update_slice(cache.tokens_BL, tokens_BT, (0, cache.length))
        agree_BKL = tokens_BS[:, None, :LENGTH] == self.seqs_KL[None]
        logits = []
        for t in range(tokens_BT.shape[1]):
            fixed_BKL = agree_BKL | (jnp.arange(LENGTH) > cache.length + t)
            next_BLV = toy_networks._conditional_logits(log_joint_K, self.seqs_KL, fixed_BKL,
                                                        VOCAB)
            logits.append(jnp.take(next_BLV, jnp.minimum(cache.length + t + 1, LENGTH - 1),
                                   axis=1))
        return jnp.stack(logits, axis=1), cache.replace(tokens_BL=tokens_BS,
                                                        length=cache.length + tokens_BT.shape[1])


class _JointDrafter:
    """p(x_l | the unmasked positions) of its own joint (toy_networks.JointDenoiser without
    the call counter)."""

    def __init__(self):
        self.seqs_KL = toy_networks.all_sequences(VOCAB, LENGTH)

    def __call__(self, log_joint_K, tokens_BL, t_B):
        tokens_B1L = tokens_BL[:, None, :]
        fixed_BKL = (tokens_B1L == self.seqs_KL[None]) | (tokens_B1L == VOCAB)
        return toy_networks._conditional_logits(log_joint_K, self.seqs_KL, fixed_BKL, VOCAB)


@pytest.fixture(scope="module")
def joint():
    """{eos id: the network}, the target's log-joint, another (a worse drafter's), and the
    law to sample: p(x_1..3 | x_0 = 1). With EOS 0 the drafts end at their first 0."""
    lm, drafter = _JointLM(), _JointDrafter()
    networks = {}
    for eos_id in (0, None):
        vocab = sampling.Vocab(mask_id=VOCAB, eos_id=eos_id)
        networks[eos_id] = DraftedCausalLM(sampling.Denoiser(drafter, vocab),
                                           sampling.CausalLM(lm.decode, lm.init_cache, vocab))
    log_joint = toy_networks.random_log_joint(np.random.default_rng(1), VOCAB, LENGTH)
    other = toy_networks.random_log_joint(np.random.default_rng(2), VOCAB, LENGTH)
    probs = np.exp(log_joint.astype(np.float64)).reshape(VOCAB, -1)
    return networks, log_joint, other, probs[1] / probs[1].sum()


def _tv(p, q):
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _sample_tv(network, params, sampler, batch):
    out = sampling.draw(sampler, network, params, jax.random.PRNGKey(0), batch_size=batch,
                        length=LENGTH, prompt=[1], num_batches=N // batch).output
    tokens = np.asarray(out.tokens_BL)[:, 1:]
    return tokens, int(out.steps)


@pytest.mark.parametrize("drafter,batch,eos_id", [
    ("target", 4, None),  # good drafts, several tokens committed per call across the batch
    pytest.param("target", 8, 0, marks=pytest.mark.slow),  # drafts cut after their first EOS
    ("other", N, None),  # every draw in one batch: one token per call
])
def test_speculative_sampling_is_the_ar_joint(joint, drafter, batch, eos_id):
    networks, log_joint, other, conditional = joint
    network = networks[eos_id]
    params = {"drafter": jnp.asarray(log_joint if drafter == "target" else other),
              "target": jnp.asarray(log_joint)}
    sampler = sampling.get_sampler("diffuspec", draft_len=3, min_draft_len=1)
    tokens, steps = _sample_tv(network, params, sampler, batch)
    tv = _tv(toy_networks.empirical(tokens, VOCAB), conditional)
    assert tv < toy_networks.tv_bound(conditional, N), tv
    if batch < N:  # several tokens are committed per call, across the batch
        assert steps < 0.95 * 3 * (N // batch)


@dataclasses.dataclass(frozen=True)
class _AlwaysAccept(DiffuSpec):
    def _log_acceptance(self, log_p_draft_BK):
        return jnp.zeros_like(log_p_draft_BK)


@dataclasses.dataclass(frozen=True)
class _ResampleFromP(DiffuSpec):
    def _residual(self, log_p_BKV, draft_BK):
        return log_p_BKV


@pytest.mark.parametrize("wrong", [_AlwaysAccept, _ResampleFromP])
def test_wrong_acceptance_rules_fail_the_check(joint, wrong):
    networks, log_joint, other, conditional = joint
    network = networks[None]
    params = {"drafter": jnp.asarray(other), "target": jnp.asarray(log_joint)}
    rule = sampling.get_sampler("diffuspec", draft_len=3, min_draft_len=1).rule
    rule = wrong(**{f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)})
    tokens, _ = _sample_tv(network, params, sampling.Sampler("wrong", rule), 1000)
    tv = _tv(toy_networks.empirical(tokens, VOCAB), conditional)
    assert tv > 3 * toy_networks.tv_bound(conditional, N), tv


# --- CPS against its criterion, computed by brute force.

def _brute_force_path(log_q_KV, context, search: CausalPathSearch):
    """The best path over the pruned lattice under S = sum_j lambda log q + (1 - lambda)
    log r, with r the add-alpha bigram counted on `context` (numpy, exhaustive)."""
    num_tokens = log_q_KV.shape[-1] - 1
    candidates = []
    for log_q_V in log_q_KV:
        order = np.argsort(-log_q_V)[:search.width]
        q = np.exp(log_q_V[order])
        candidates.append(order[(np.cumsum(q) - q) < search.mass])
    pairs = {}
    for a, b in zip(context[:-1], context[1:]):
        pairs[a, b] = pairs.get((a, b), 0) + 1
    seen = {a: sum(c for (x, _), c in pairs.items() if x == a) for a in set(context)}

    def log_r(prev, token):
        return np.log((pairs.get((prev, token), 0) + search.smoothing)
                      / (seen.get(prev, 0) + search.smoothing * num_tokens))

    def score(path):
        prev, total = context[-1], 0.0
        for log_q_V, token in zip(log_q_KV, path):
            total += search.weight * log_q_V[token] + (1 - search.weight) * log_r(prev, token)
            prev = token
        return total

    return list(max(itertools.product(*candidates), key=score))


def _lattice(probs_KV):
    probs_KV = np.asarray(probs_KV, np.float64)
    with np.errstate(divide="ignore"):
        return np.log(np.concatenate([probs_KV, np.zeros((len(probs_KV), 1))], axis=1))


def _search(search, log_q_KV, context, eos_id=None, fixed=None):
    k = log_q_KV.shape[0]
    fixed_tokens = np.zeros((1, k), np.int32) if fixed is None else fixed[1][None]
    fixed = np.zeros((1, k), bool) if fixed is None else fixed[0][None]
    path, drafted = search(jnp.asarray(log_q_KV[None], jnp.float32), jnp.asarray(fixed),
                           jnp.asarray(fixed_tokens), jnp.asarray(np.array(context)[None],
                                                                  jnp.int32),
                           jnp.asarray(len(context), jnp.int32), eos_id)
    return np.asarray(path[0]).tolist(), np.asarray(drafted[0]).tolist()


def test_cps_follows_the_causal_proxy_not_the_per_position_argmax():
    # The context has 2 -> 3 -> 4 twice; the drafter slightly prefers 1 then 0 position by
    # position, which reads against the context's order.
    context = [2, 3, 4, 2, 3, 4, 2]
    log_q_KV = _lattice([[0.0, 0.55, 0.0, 0.45, 0.0],
                         [0.5, 0.0, 0.1, 0.0, 0.4]])
    search = CausalPathSearch(width=3, mass=0.95, beams=3)
    assert np.argmax(log_q_KV, axis=-1).tolist() == [1, 0]
    expected = _brute_force_path(log_q_KV, context, search)
    assert expected == [3, 4]
    assert _search(search, log_q_KV, context)[0] == expected
    # Without the proxy the path is the per-position argmax.
    assert _search(dataclasses.replace(search, proxy="none"), log_q_KV, context)[0] == [1, 0]
    # The mass cut: with tau = 0.5 each position keeps its top candidate only.
    assert _search(dataclasses.replace(search, mass=0.5), log_q_KV, context)[0] == [1, 0]
    # A known position holds its token on the path; EOS (0) ends it and is kept as a
    # candidate even when the cut dropped it.
    fixed = (np.array([True, False]), np.array([3, 0]))
    assert _search(search, log_q_KV, context, fixed=fixed)[0] == [3, 4]
    path, drafted = _search(CausalPathSearch(proxy="none"), _lattice(
        [[0.6, 0.4, 0, 0, 0], [0.8, 0.2, 0, 0, 0]]), context, eos_id=0)
    assert (path, drafted) == ([0, 0], [True, False])
    # A path that ends is scored as padded with EOS: ending does not skip the later terms.
    path, drafted = _search(CausalPathSearch(proxy="none"), _lattice(
        [[0.6, 0.4, 0, 0, 0], [0.05, 0.95, 0, 0, 0]]), context, eos_id=0)
    assert (path, drafted) == ([1, 1], [True, True])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cps_is_its_criterions_argmax_on_random_lattices(seed):
    rng = np.random.default_rng(seed)
    log_q_KV = _lattice(rng.dirichlet(np.full(5, 0.5), size=3))
    context = rng.integers(0, 5, 12).tolist()
    # Enough beams to keep every partial path: the search is then exhaustive.
    search = CausalPathSearch(width=4, mass=0.9, beams=16, weight=0.3)
    assert _search(search, log_q_KV, context)[0] == _brute_force_path(log_q_KV, context, search)


def test_adl_grows_on_acceptance_and_shrinks_on_rejection():
    adl = AdaptiveDraftLength(min_len=2, max_len=8, margin=2, decay=0.5)
    average = adl.init(1)
    lengths = [int(adl.draft_len(average)[0])]
    assert lengths == [8]
    for _ in range(6):  # every draft rejected at once
        average = adl.update(average, jnp.zeros((1,)))
        lengths.append(int(adl.draft_len(average)[0]))
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] == 2 and lengths[1] < 8
    for _ in range(10):  # every draft accepted whole
        average = adl.update(average, jnp.asarray([lengths[-1]], jnp.float32))
        lengths.append(int(adl.draft_len(average)[0]))
    grown = lengths[7:]
    assert all(b > a for a, b in zip(grown, grown[1:]) if a < 8) and grown[-1] == 8
    # The bounds clip: no margin and nothing accepted stays at min_len.
    low = AdaptiveDraftLength(min_len=3, max_len=5, margin=0)
    assert int(low.draft_len(low.update(low.init(1), jnp.zeros((1,))))[0]) == 3
    # Rows move apart: each follows its own acceptance.
    two = adl.update(adl.init(2), jnp.asarray([8.0, 0.0]))
    assert np.asarray(adl.draft_len(two)).tolist() == [8, 6]


def test_options_and_networks_are_checked(random_pair):
    for options, message in [
        ({"draft_len": 0}, "draft_len=0 must be a positive int"),
        ({"min_draft_len": 0}, "min_draft_len=0 must be an int >= 1"),
        ({"min_draft_len": 9}, "min_draft_len=9 must be <= draft_len=8"),
        ({"adl_decay": 0.0}, "adl_decay=0.0 must lie in"),
        ({"cps_mass": 0.0}, "cps_mass=0.0 must lie in"),
        ({"cps_weight": 1.5}, "cps_weight=1.5 must lie in"),
        ({"cps_proxy": "kenlm"}, "cps_proxy='kenlm'; allowed: context, none"),
        ({"cps_beams": 0}, "cps_beams=0 must be an int >= 1"),
        ({"window": 4}, "has no option 'window'"),
        ({"acceptance": "greedy"}, "temperature=1.0 must be 0"),
        ({"acceptance": "speculative", "temperature": 0.0}, "temperature=0 must be > 0"),
        ({"acceptance": "maybe"}, "acceptance='maybe'; allowed"),
    ]:
        with pytest.raises(ValueError, match=message):
            sampling.get_sampler("diffuspec", **options)
    network, params, _ = random_pair
    with pytest.raises(ValueError, match="share one vocabulary"):
        DraftedCausalLM(dataclasses.replace(network.drafter, vocab=sampling.Vocab(V - 1)),
                        network.target)
    sampler = sampling.get_sampler("diffuspec")
    with pytest.raises(ValueError, match="cannot sample an autoregressive network"):
        sampling.draw(sampler, network.target, params["target"], jax.random.PRNGKey(0),
                      batch_size=1, length=L, prompt=[2])
    wider = dataclasses.replace(network.drafter, apply_fn=_Wider(network.drafter.apply_fn))
    with pytest.raises(ValueError, match="drafter's logits cover 25 tokens, the target's 24"):
        sampling.draw(sampler, DraftedCausalLM(wider, network.target), params,
                      jax.random.PRNGKey(0), batch_size=1, length=L, prompt=[2])


@dataclasses.dataclass(frozen=True)
class _Wider:
    apply_fn: object

    def __call__(self, params, tokens_BL, t_B):
        logits = self.apply_fn(params, tokens_BL, t_B)
        return jnp.concatenate([logits, logits[..., :1]], axis=-1)
