"""The lm-evaluation-harness adapter: AR log-likelihoods against a direct forward pass,
`is_greedy` against a greedy loop over that forward, rolling scores against the chain rule,
`generate_until`'s stops and budget, diffusion likelihoods as NELBO bounds, and lm_eval end
to end on local task files (generate_until and multiple choice)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from configs import ar, mdlm
from dlm import runs
from dlm.data import sft
from dlm.runs import harness, loading
from dlm.runs.drawing import make_sampler
from dlm.training import trainer

TASK_DATA = {"data.name": "task", "data.task": "addition", "data.task_examples": (64, 16, 16),
             "data.seq_len": 24}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """{process: (workdir, run)}: tiny runs fine-tuned on addition, weights moved at random
    so that outputs depend on their context."""
    root = tmp_path_factory.mktemp("harness")
    out = {}
    for name, method in (("ar", ar), ("mdlm", mdlm)):
        config = small_config(root / "tfds", method, **TASK_DATA, total_steps=2,
                              checkpoint_every=2)
        trainer.train(config, root / name)
        run = loading.load_run(root / name)
        leaves, tree = jax.tree.flatten(run.params)
        keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
        params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
                                           for p, k in zip(leaves, keys)])
        out[name] = (root / name, dataclasses.replace(run, params=params))
    return out


def _ar_log_probs(run, context: str, continuation: str):
    """The log-probability of the continuation by one causal forward pass, and the
    greedy continuation of the same length by a loop over that forward."""
    specials = sft.Specials.of(run.tokenizer)
    prompt = sft.encode_prompt(run.tokenizer.encode(context), specials)
    target = np.asarray(run.tokenizer.encode(continuation))
    tokens = np.concatenate([prompt, target])[None]
    mask_id = run.network.vocab.mask_id  # never a token: zero probability

    def forward(ids):
        logits = np.asarray(run.module.apply({"params": run.params}, jnp.asarray(ids), None,
                                             train=False)[0], np.float64)
        logits[:, mask_id] = -np.inf
        return logits

    log_probs = jax.nn.log_softmax(forward(tokens), axis=-1)
    scored = [log_probs[len(prompt) + i - 1, t] for i, t in enumerate(target)]
    greedy = list(prompt)
    for _ in range(len(target)):
        greedy.append(int(np.argmax(forward([greedy])[-1])))
    return float(np.sum(scored)), np.asarray(greedy[len(prompt):])


def test_ar_log_likelihood_is_the_exact_causal_score(loaded):
    _, run = loaded["ar"]
    scorer = harness.Scorer(run, make_sampler("ar", overrides={"temperature": 0.0}),
                            batch_size=3, nll_draws=1)
    pairs = [("12+3=", "15"), ("7+80=", "87"), ("", "1+1=2"), ("45+45=", "9")]
    got = scorer.loglikelihood(pairs)
    for (context, continuation), (value, is_greedy) in zip(pairs, got):
        expected, greedy_ids = _ar_log_probs(run, context, continuation)
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-4)
        assert is_greedy == np.array_equal(greedy_ids, run.tokenizer.encode(continuation))
    # The greedy continuation itself is greedy (unless it is or holds a special token).
    _, greedy_ids = _ar_log_probs(run, "12+3=", "000")
    text = run.tokenizer.decode(greedy_ids, skip_special=True)
    if len(text) == 3:
        assert scorer.loglikelihood([("12+3=", text)])[0][1]


def test_rolling_is_the_chain_rule_for_ar(loaded):
    _, run = loaded["ar"]
    scorer = harness.Scorer(run, make_sampler("ar", overrides={"temperature": 0.0}),
                            nll_draws=1)
    text = "12+34=46 7+8=15"  # 15 tokens: pieces of 11, each with the text before it
    assert len(text) > (scorer.length - 2) // 2 and len(text) <= scorer.length - 2
    [rolled] = scorer.loglikelihood_rolling([text])
    [(whole, _)] = scorer.loglikelihood([("", text)])
    np.testing.assert_allclose(rolled, whole, rtol=1e-4, atol=1e-4)


def test_generate_until_stops_and_budget(loaded):
    _, run = loaded["mdlm"]
    sampler = make_sampler("llada", overrides={"suppress_eos": True})
    scorer = harness.Scorer(run, sampler, batch_size=2)
    contexts = ["12+3=", "7+80=", "5+5="]
    full = [run.tokenizer.decode(ids, skip_special=True) for ids in scorer.generate(contexts, 5)]
    assert all(len(t) == 5 for t in full)  # no EOS: the whole budget
    stop = full[0][2]
    got = scorer.generate_until([(c, {"until": [stop], "max_gen_toks": 5}) for c in contexts])
    assert got == [t[:t.index(stop)] if stop in t else t for t in full]
    short = scorer.generate_until([(contexts[0], {"max_gen_toks": 2})])
    assert len(short[0]) <= 2
    with pytest.raises(ValueError, match="request 0: its context leaves no room"):
        scorer.generate_until([("1" * 30, {})])


def test_diffusion_log_likelihood_is_a_seeded_bound(loaded):
    _, run = loaded["mdlm"]
    scorer = harness.Scorer(run, make_sampler("llada"), batch_size=4, nll_draws=4)
    pairs = [("12+3=", "15"), ("7+80=", "87"), ("1+1=", "2")]
    first = [v for v, _ in scorer.loglikelihood(pairs)]
    assert first == [v for v, _ in scorer.loglikelihood(pairs)]  # seeded
    assert all(np.isfinite(v) and v < 0 for v in first)
    other = harness.Scorer(run, make_sampler("llada"), batch_size=4, nll_draws=4, seed=1)
    assert [v for v, _ in other.loglikelihood(pairs)] != first  # Monte-Carlo draws


def test_bad_requests_are_named(loaded, tmp_path):
    _, run = loaded["mdlm"]
    scorer = harness.Scorer(run, make_sampler("llada"))
    with pytest.raises(ValueError, match="request 0: 7 prompt tokens .* exceed length=24"):
        scorer.loglikelihood([("12345", "1" * 20)])
    with pytest.raises(ValueError, match="nll_draws=0 must be >= 1"):
        harness.Scorer(run, make_sampler("llada"), nll_draws=0)


@pytest.mark.slow  # run by .ci/run after `make test` (make test-slow)
def test_lm_eval_end_to_end_on_local_tasks(loaded, tmp_path, monkeypatch):
    from dlm.runs import lm_eval_model  # the [harness] extra, installed by `make test`

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    workdir, _ = loaded["ar"]
    docs = [{"prompt": "12+3=", "answer": "15", "choices": ["15", "51", "99"], "gold": 0},
            {"prompt": "7+80=", "answer": "87", "choices": ["78", "87", "11"], "gold": 1},
            {"prompt": "5+5=", "answer": "10", "choices": ["1", "55", "10"], "gold": 2}]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" \
             "test_split: test\n"
    (tasks_dir / "toy_gen.yaml").write_text(
        "task: dlm_toy_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['+']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")
    (tasks_dir / "toy_mc.yaml").write_text(
        "task: dlm_toy_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    results = lm_eval_model.evaluate(str(workdir), ["dlm_toy_gen", "dlm_toy_mc"],
                                     include_path=str(tasks_dir), sampler="ar",
                                     sampler_options={"temperature": 0.0}, nll_draws=1)
    run = runs.load_run(workdir)
    scorer = harness.Scorer(run, make_sampler("ar", overrides={"temperature": 0.0}),
                            nll_draws=1)
    # Multiple choice: the accuracy of the adapter's own likelihoods.
    expected = np.mean([int(np.argmax([v for v, _ in scorer.loglikelihood(
        [(d["prompt"], c) for c in d["choices"]])])) == d["gold"] for d in docs])
    assert results["dlm_toy_mc"]["acc,none"] == pytest.approx(expected)
    answers = scorer.generate_until([(d["prompt"], {"until": ["+"], "max_gen_toks": 4})
                                     for d in docs])
    expected = np.mean([a == d["answer"] for a, d in zip(answers, docs)])
    assert results["dlm_toy_gen"]["exact_match,none"] == pytest.approx(expected)
