"""Early exit (Prophet, SchED) and remasking (RCR, backtracking): `dlm.sampling.adaptive`.

References: the base samplers themselves (each policy's degenerate setting must leave them
unchanged token for token under one key); a numpy loop written from each remasking
policy's definition on an exactly known toy joint; the exit rule's aggregate recomputed
from one direct forward. And on a DiT, the dual cache and the bd3lm sampler: the policies
run there and keep the invariants (known positions unchanged, every run complete within
`max_steps`, re-masked tokens counted).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_kv_reuse
import test_sampling_bd3lm
import toy_networks

from dlm import sampling
from dlm.sampling import adaptive
from dlm.sampling.networks import Denoiser, Vocab

V, L = 3, 6  # the toy joint: 3 real tokens (mask id 3), 6 positions
PROMPT = (2,)
INF = float("inf")
OFF = {"early_exit": "linear", "exit_high": INF, "exit_low": INF}  # never fires


class LeaveOneOut(toy_networks.JointDenoiser):
    """p(x_l | every other unmasked position) at *every* position l, committed ones too:
    a network that predicts all positions (as LLaDA's), so a committed token's probability
    can fall once its context fills in."""

    def __call__(self, log_joint_K, tokens_BL, t_B):
        del t_B
        columns = []
        for pos in range(self.length):
            tokens_B1L = jnp.asarray(tokens_BL).at[:, pos].set(self.mask_id)[:, None, :]
            fixed_BKL = (tokens_B1L == self.seqs_KL[None]) | (tokens_B1L == self.mask_id)
            columns.append(toy_networks._conditional_logits(
                log_joint_K, self.seqs_KL, fixed_BKL, self.vocab_size)[:, pos])
        return jnp.stack(columns, axis=1)

    def network(self) -> Denoiser:
        return Denoiser(self, Vocab(mask_id=self.mask_id, eos_id=0, pad_id=1))


@pytest.fixture(scope="module")
def toy():
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(0), V, L))
    return {"joint": toy_networks.JointDenoiser(V, L).network(),
            "loo": LeaveOneOut(V, L).network(), "params": log_joint}


def _draw(network, params, name="llada", batch=2, length=L, prompt=PROMPT, seed=0, **options):
    return sampling.draw(sampling.get_sampler(name, **options), network, params,
                         jax.random.PRNGKey(seed), batch_size=batch, length=length,
                         prompt=np.asarray(prompt, np.int32)).output


def _same(a, b):
    np.testing.assert_array_equal(a.tokens_BL, b.tokens_BL)
    np.testing.assert_array_equal(a.commit_step_BL, b.commit_step_BL)
    assert int(a.nfe) == int(b.nfe)


# --- degenerate settings are the base samplers -------------------------------------------

@pytest.mark.parametrize("name,options", [
    ("llada", {"block_length": None}), ("fast_dllm", {"threshold": 0.8}),
    pytest.param("llada", {"block_length": 3, "temperature": 1.0}, marks=pytest.mark.slow),
    pytest.param("dream", {}, marks=pytest.mark.slow)])  # sampled, top-p 0.95
@pytest.mark.parametrize("adaptive_options", [
    OFF, {"early_exit": "prophet", "exit_high": INF, "exit_low": INF},
    {"remask": "rcr", "remask_per_step": 0}, {"remask": "backtrack", "remask_per_step": 3,
                                              "remask_total": 0}])
def test_degenerate_settings_equal_the_base_sampler(toy, name, options, adaptive_options):
    base = _draw(toy["loo"], toy["params"], name, **options)
    ours = _draw(toy["loo"], toy["params"], name, **options, **adaptive_options)
    _same(ours, base)
    assert not np.any(ours.remasked_B)


# --- early exit ---------------------------------------------------------------------------

def _first_forward(toy, network="joint"):
    tokens_BL = np.full((1, L), V, np.int32)
    tokens_BL[0, 0] = PROMPT[0]
    log_probs = jax.nn.log_softmax(toy[network].apply_fn(toy["params"], tokens_BL, None), -1)
    return np.asarray(log_probs)[0]  # [L, V + 1]


def test_the_exit_fires_on_the_mean_top2_margin_over_the_open_positions(toy):
    log_probs_LV = _first_forward(toy)
    top2 = np.sort(log_probs_LV[1:], axis=-1)[:, ::-1]
    margin = float(np.mean(top2[:, 0] - top2[:, 1]))  # the 5 open positions at step 0
    below = _draw(toy["joint"], toy["params"], block_length=None, early_exit="linear",
                  exit_high=margin * 0.999, exit_low=margin * 0.999)
    # All in at the first step, with its proposals (greedy: the argmax).
    assert int(below.nfe) == 1
    np.testing.assert_array_equal(below.tokens_BL[0, 1:], np.argmax(log_probs_LV[1:], -1))
    assert np.all(below.commit_step_BL[:, 1:] == 0)
    above = _draw(toy["joint"], toy["params"], block_length=None, early_exit="linear",
                  exit_high=margin * 1.001, exit_low=margin * 1.001)
    assert int(above.commit_step_BL[0, 1:].max()) > 0


def test_schedules_fall_with_progress_from_high_to_low():
    p = jnp.linspace(0.0, 1.0, 11)
    for schedule in adaptive.EXIT_SCHEDULES:
        tau = np.asarray(adaptive.EarlyExit(schedule, high=8.0, low=2.0).threshold(p))
        assert np.all(np.diff(tau) <= 1e-6), schedule
        assert tau[0] == pytest.approx(8.0)
        assert tau[-1] == pytest.approx(2.0, abs=0.2 if schedule == "exp" else 1e-6)
    prophet = adaptive.EarlyExit("prophet", high=7.5, low=2.5)
    np.testing.assert_allclose(prophet.threshold(jnp.array([0.2, 0.5, 0.9])), [7.5, 5.0, 2.5])
    with pytest.raises(ValueError, match="early_exit='soon'; allowed: none, prophet"):
        sampling.get_sampler("llada", early_exit="soon")
    with pytest.raises(ValueError, match="high=1.0 < low=2.0"):
        sampling.get_sampler("llada", early_exit="cosine", exit_high=1.0, exit_low=2.0)


def test_the_content_span_leaves_out_positions_predicted_to_be_the_fill():
    # Two answer positions with small margins, four fill (EOS, id 0) positions with large.
    margins = np.array([1.0, 2.0, 20.0, 20.0, 20.0, 20.0])
    log_probs = np.full((1, 6, 4), -100.0, np.float32)
    top = np.array([2, 3, 0, 0, 0, 0])
    log_probs[0, np.arange(6), top] = 0.0
    log_probs[0, np.arange(6), (top + 1) % 4] = -margins
    span = np.ones((1, 6), bool)
    rule = {s: adaptive.EarlyExit("linear", high=10.0, low=10.0, span=s)
            for s in adaptive.EXIT_SPANS}
    assert bool(rule["all"](jnp.asarray(log_probs), span, 0.5, (0,))[0])  # mean 13.75
    assert not bool(rule["content"](jnp.asarray(log_probs), span, 0.5, (0,))[0])  # 1.5
    # Only the fill left: its own margins decide.
    assert bool(rule["content"](jnp.asarray(log_probs), span & (top == 0), 0.5, (0,))[0])
    # The minimum: every position of the span must clear the threshold (mean 13.75, min 1).
    for threshold, fires in ((1.0, True), (1.5, False)):
        rule = adaptive.EarlyExit("linear", high=threshold, low=threshold, aggregate="min")
        assert bool(rule(jnp.asarray(log_probs), span, 0.5, (0,))[0]) == fires


def test_a_full_forward_exits_over_the_whole_sequence_a_cache_over_the_block(dit):
    network, params = dit
    always = {"early_exit": "cosine", "exit_high": -1.0, "exit_low": -1.0}
    full = test_kv_reuse._draw(network, params, "llada", block_length=8, **always)
    assert int(full.nfe) == 1 and np.all(np.asarray(full.done_B))
    cached = test_kv_reuse._draw(network, params, "llada", block_length=8, cache="dual",
                                 **always)
    # One step per block of 8 over the 27 generated positions (blocks from position 5).
    assert int(cached.steps) == 4 and np.all(np.asarray(cached.done_B))
    reference = test_kv_reuse._draw(network, params, "llada", block_length=8, cache="dual")
    assert int(cached.nfe) < int(reference.nfe)


# --- remasking against a loop written from its definition --------------------------------

def _reference(network, params, steps, policy, per_step, total, threshold=0.0):
    """Greedy one-block LLaDA decoding of one row, with RCR or backtracking as defined:
    each step commits the ceil(open / steps left) most confident open positions (RCR: r
    more), then, except at the last step, re-opens up to r committed positions: RCR the r
    lowest commit confidences; backtracking those committed at an earlier step whose
    probability under this step's logits is below the threshold, lowest first."""
    tokens = np.full(L, V, np.int64)
    tokens[0] = PROMPT[0]
    known = np.arange(L) < len(PROMPT)
    confidence = np.full(L, np.nan)
    commit_step = np.full(L, -1)
    remasked = 0
    for step in range(steps):
        log_probs = np.asarray(jax.nn.log_softmax(
            network.apply_fn(params, tokens[None].astype(np.int32), None), -1))[0]
        proposal, prob = log_probs.argmax(-1), np.exp(log_probs.max(-1))
        current = np.exp(log_probs[np.arange(L), np.minimum(tokens, V)])
        open_ = (tokens == V) & ~known
        if not open_.any():
            break
        count = -(-open_.sum() // (steps - step))
        r = 0 if step == steps - 1 else min(per_step, total - remasked)
        extra = r if policy == "rcr" else 0
        order = sorted(np.flatnonzero(open_), key=lambda i: (-prob[i], i))
        chosen = order[:count + extra]
        extra = len(chosen) - count
        tokens[chosen], confidence[chosen], commit_step[chosen] = proposal[chosen], prob[
            chosen], step
        committed = (tokens != V) & ~known
        if policy == "rcr":
            pool = sorted(np.flatnonzero(committed), key=lambda i: (confidence[i], i))[:extra]
        else:
            pool = [i for i in np.flatnonzero(committed & (commit_step < step))
                    if current[i] < threshold]
            pool = sorted(pool, key=lambda i: (current[i], i))[:r]
        tokens[pool], confidence[pool], commit_step[pool] = V, np.nan, -1
        remasked += len(pool)
    return tokens, remasked


@pytest.mark.parametrize("policy,per_step,total,threshold,seed", [
    ("rcr", 1, 100, 0.1, 0), ("rcr", 2, 3, 0.1, 1), ("rcr", 10, 100, 0.1, 2),
    ("backtrack", 1, 100, 0.9, 0), ("backtrack", 2, 3, 0.95, 3)])
def test_remasking_equals_its_definition(policy, per_step, total, threshold, seed):
    log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(seed), V, L))
    network = LeaveOneOut(V, L).network()
    steps = 5
    expected, remasked = _reference(network, log_joint, steps, policy, per_step, total,
                                    threshold)
    out = _draw(network, log_joint, "llada", batch=1, block_length=None, steps=steps,
                remask=policy, remask_per_step=per_step, remask_total=total,
                remask_threshold=threshold)
    np.testing.assert_array_equal(out.tokens_BL[0], expected)
    assert int(out.remasked_B[0]) == remasked
    assert int(out.remasked_B[0]) <= total


def test_the_toy_backtracks_and_rcr_remasks():
    """The reference test above is not vacuous: its cases do re-open positions."""
    counts = {}
    for policy, seed, threshold in (("rcr", 0, 0.1), ("backtrack", 0, 0.9),
                                    ("backtrack", 3, 0.95)):
        log_joint = jnp.asarray(toy_networks.random_log_joint(np.random.default_rng(seed),
                                                              V, L))
        counts[policy, seed] = _reference(LeaveOneOut(V, L).network(), log_joint, 5, policy,
                                          1, 100, threshold)[1]
    assert all(count > 0 for count in counts.values()), counts


def test_remasking_without_a_schedule_still_ends_within_max_steps(toy):
    """fast_dllm's threshold rule commits at least one position a step and has no last
    scheduled step: the budget keeps re-opened positions within the step budget."""
    sampler = sampling.get_sampler("fast_dllm", threshold=0.99, remask="rcr",
                                   remask_per_step=4)
    out = _draw(toy["loo"], toy["params"], "fast_dllm", threshold=0.99, remask="rcr",
                remask_per_step=4)
    assert np.all(np.asarray(out.done_B))
    assert int(out.steps) <= sampler.rule.max_steps(L)
    assert np.all(np.asarray(out.remasked_B) > 0)
    assert np.all(out.tokens_BL[:, 0] == PROMPT[0])


def test_remasking_needs_a_confidence_ordered_rule():
    with pytest.raises(ValueError, match="remasking takes confidence-ordered commits"):
        sampling.get_sampler("bd3lm", remask="rcr")  # first hitting: a time plan
    with pytest.raises(ValueError, match="remask_per_step=-1 must be an int >= 0"):
        sampling.get_sampler("llada", remask="rcr", remask_per_step=-1)
    with pytest.raises(ValueError, match="remask='undo'; allowed: none, rcr, backtrack"):
        sampling.get_sampler("llada", remask="undo")
    # Options of a policy left off are checked all the same (a typo is never ignored).
    with pytest.raises(ValueError, match="exit_span='middle'; allowed: all, content"):
        sampling.get_sampler("llada", exit_span="middle")
    with pytest.raises(ValueError, match="remask_per_step=-2 must be an int >= 0"):
        sampling.get_sampler("fast_dllm", remask_per_step=-2)


# --- credit decoding (dInfer) against its definition -------------------------------------

def test_credit_with_alpha_0_is_the_base_sampler(toy):
    for options in ({"threshold": 0.9}, {"threshold": 0.9, "block_length": 3}):
        base = sampling.get_sampler("fast_dllm", **options)
        zero = dataclasses.replace(base, rule=dataclasses.replace(
            base.rule, history=adaptive.Credit(alpha=0.0)))
        outs = [sampling.draw(s, toy["joint"], toy["params"], jax.random.PRNGKey(0),
                              batch_size=2, length=L, prompt=np.asarray(PROMPT)).output
                for s in (base, zero)]
        _same(*outs)


@pytest.mark.parametrize("alpha,threshold", [(0.7, 0.9), (2.0, 0.8)])
def test_credit_decoding_equals_its_definition(toy, alpha, threshold):
    """fast_dllm's threshold rule on the fused logits: C decays by beta, gains p^gamma at
    each open position's top-1; decode from logits + alpha log(1 + C)."""
    gamma, beta = 0.2, 0.8
    network, params = toy["joint"], toy["params"]
    tokens = np.full(L, V, np.int64)
    tokens[0] = PROMPT[0]
    commit_step = np.full(L, -1)
    credit = np.zeros((L, V + 1))
    for step in range(L):
        open_ = tokens == V
        open_[0] = False
        if not open_.any():
            break
        logits = np.asarray(network.apply_fn(params, tokens[None].astype(np.int32), None),
                            np.float64)[0]
        log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        credit *= beta
        top = log_probs.argmax(-1)
        credit[np.arange(L), top] += np.where(open_, np.exp(log_probs.max(-1)) ** gamma, 0)
        fused = logits + alpha * np.log1p(credit)
        fused_log_probs = fused - np.logaddexp.reduce(fused, axis=-1, keepdims=True)
        proposal, prob = fused_log_probs.argmax(-1), np.exp(fused_log_probs.max(-1))
        commit = open_ & (prob > threshold)
        commit[max(np.flatnonzero(open_), key=lambda i: (prob[i], -i))] = True
        tokens[commit], commit_step[commit] = proposal[commit], step
    out = _draw(network, params, "fast_dllm", batch=1, threshold=threshold,
                credit_alpha=alpha, credit_gamma=gamma, credit_beta=beta)
    np.testing.assert_array_equal(out.tokens_BL[0], tokens)
    np.testing.assert_array_equal(out.commit_step_BL[0], commit_step)
    plain = _draw(network, params, "fast_dllm", batch=1, threshold=threshold)
    # Not vacuous: the credit changes the order of the commits here.
    assert not np.array_equal(out.commit_step_BL, plain.commit_step_BL)


def test_freedave_takes_no_step_history():
    with pytest.raises(ValueError, match="stale logits: its base takes none"):
        sampling.get_sampler("bd3lm", policy="threshold", freedave=4, credit_alpha=0.7)


# --- composition: the dual cache and the bd3lm sampler ------------------------------------

dit = test_kv_reuse.dit
POLICIES = {"prophet": {"early_exit": "prophet", "exit_high": 4.0, "exit_low": 1.0},
            "sched": {"early_exit": "exp", "exit_high": 6.0, "exit_low": 1.0},
            "rcr": {"remask": "rcr", "remask_per_step": 2},
            "backtrack": {"remask": "backtrack", "remask_threshold": 0.5},
            "credit": {"credit_alpha": 0.7}}


def _invariants(out, prompt, max_steps, mask_id):
    tokens = np.asarray(out.tokens_BL)
    assert np.all(tokens[:, :len(prompt)] == np.asarray(prompt))
    assert np.all(np.asarray(out.done_B)) and not np.any(tokens == mask_id)
    assert int(out.steps) <= max_steps
    assert np.all(np.asarray(out.remasked_B) >= 0)


# One exit, one remasking policy and the credit in the default run; the others in make
# test-slow (the default run's time budget).
DEFAULT = ("prophet", "rcr", "credit")


@pytest.mark.parametrize("policy", [
    p if p in DEFAULT else pytest.param(p, marks=pytest.mark.slow) for p in POLICIES])
def test_each_policy_runs_with_the_dual_cache(dit, policy):
    network, params = dit
    options = {"block_length": 8, "steps": 16, "cache": "dual", **POLICIES[policy]}
    out = test_kv_reuse._draw(network, params, "llada", **options)
    sampler = sampling.get_sampler("llada", **options)
    _invariants(out, (1, 2, 3, 4, 5), sampler.rule.max_steps(test_kv_reuse.L),
                network.vocab.mask_id)
    if policy == "rcr":
        assert np.all(np.asarray(out.remasked_B) > 0)


@pytest.fixture(scope="module")
def block_dit():
    model, params = test_sampling_bd3lm._dit(2, block_size=4)
    return test_sampling_bd3lm._network(model, 4), params


@pytest.mark.parametrize("policy,kv_cache", [
    *[(policy, True) if policy in DEFAULT else pytest.param(policy, True,
                                                            marks=pytest.mark.slow)
      for policy in POLICIES],
    *[pytest.param(policy, False, marks=pytest.mark.slow) for policy in POLICIES]])
def test_each_policy_runs_inside_bd3lm_blocks(block_dit, policy, kv_cache):
    network, params = block_dit
    options = {"policy": "fixed_count", "steps": 4, "kv_cache": kv_cache, **POLICIES[policy]}
    prompt = (2, 3, 4, 5, 6)
    out = test_sampling_bd3lm._draw(network, params, prompt=prompt, **options)
    sampler = sampling.get_sampler("bd3lm", **options).rule.for_network(network)
    _invariants(out, prompt, sampler.max_steps(test_sampling_bd3lm.L), network.vocab.mask_id)
    base = test_sampling_bd3lm._draw(network, params, prompt=prompt, policy="fixed_count",
                                     steps=4, kv_cache=kv_cache)
    assert int(out.nfe) <= int(base.nfe) or policy in ("rcr", "backtrack")
    if policy == "rcr":
        assert np.all(np.asarray(out.remasked_B) > 0)
