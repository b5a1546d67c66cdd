"""The `tasks` benchmark suite's pieces that need no training: its flags' parsing, that every
sampler setting it runs builds and fits its model, its verdicts on hand-made results, and the
demo's console progress line."""

import logging

import pytest

from dlm import sampling
from dlm.diffusion import make_process
from experiments import task_benchmarks


def test_steps_entries():
    entries = ["1500", "word_problems=600"]
    assert task_benchmarks.steps_for("addition", entries) == 1500
    assert task_benchmarks.steps_for("word_problems", entries) == 600
    with pytest.raises(ValueError, match="no steps for task 'sudoku'"):
        task_benchmarks.steps_for("sudoku", ["addition=5"])
    with pytest.raises(ValueError, match="'sudoku=many'"):
        task_benchmarks.steps_for("sudoku", ["sudoku=many"])


@pytest.mark.parametrize("method", ["mdlm", "bd3lm", "ar"])
def test_every_setting_builds_a_sampler_for_its_model(method):
    from configs import sft

    config = sft.get_config(f"{method},addition")
    kind = make_process(config, vocab_size=16).network_kind
    settings = task_benchmarks.settings_for(method, 16, [0.5, 0.7, 0.9], 1.0)
    labels = [label for label, _, _ in settings]
    assert len(set(labels)) == len(labels)  # labels name the cached summaries
    for label, name, options in settings:
        sampler = sampling.get_sampler(name, **options)
        assert sampler.rule.network_kind == kind, label
    if method == "mdlm":
        assert {"mdlm 4 steps", "mdlm 16 steps", "llada (1 token/call)", "fast_dllm 0.9",
                "fast_dllm factor 1"} <= set(labels)
    if method == "bd3lm":  # the threshold policy only at thresholds >= 0.7
        assert "bd3lm threshold 0.5" not in labels and "bd3lm threshold 0.9" in labels


def _result(task, method, setting, accuracy, tokens_per_call=1.0, n=400):
    return {"task": task, "method": method, "setting": setting, "accuracy": accuracy,
            "accuracy_stderr": (accuracy * (1 - accuracy) / n) ** 0.5,
            "tokens_per_call": tokens_per_call, "tokens_per_second": 100.0, "mean_nfe": 4.0}


def test_checks_state_whether_each_claim_holds():
    results = [_result("w", "mdlm", "llada (1 token/call)", 0.5),
               _result("w", "mdlm", "fast_dllm 0.9", 0.49, tokens_per_call=3.2),
               _result("w", "ar", "ar greedy", 0.3),
               _result("s", "mdlm", "llada (1 token/call)", 0.5),
               _result("s", "mdlm", "fast_dllm 0.9", 0.40, tokens_per_call=3.5),
               _result("s", "ar", "ar greedy", 0.5)]
    w_fast, w_models, s_fast, s_models = task_benchmarks.checks(results)
    assert "claim holds" in w_fast and "mdlm beats AR" in w_models
    assert "does not hold" in s_fast and "mdlm ties AR" in s_models
    # Fewer than 3 tokens per call fails the claim whatever the accuracy.
    slow = [_result("w", "mdlm", "llada (1 token/call)", 0.5),
            _result("w", "mdlm", "fast_dllm 0.9", 0.5, tokens_per_call=2.9)]
    assert "does not hold" in task_benchmarks.checks(slow)[0]


def test_demo_progress_line(capsys):
    from dlm.training import metrics

    logger = logging.getLogger("absl")
    handler, level = metrics.ProgressLine(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # what absl.app sets at its default --verbosity=0
    try:
        metrics.Progress(0, 50).report(10, 1.25)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    line = capsys.readouterr().out
    assert line.startswith("\r  training: step 10/50  loss 1.250") and "ETA 0:00:" in line
