"""The `speculative` benchmark suite's pieces that need no training: every setting it runs
builds its sampler, and its verdicts on hand-made rows."""

from dlm import sampling
from experiments import speculative_benchmarks


def test_every_setting_builds_and_its_reference_comes_first():
    for method, reference, kind in (("mdlm", "llada", "denoiser"), ("ar", "ar", "causal")):
        rows = speculative_benchmarks.settings(method)
        assert rows[0][1] == reference
        for _, name, options in rows:
            rule = sampling.get_sampler(name, **options).rule
            paired = name in speculative_benchmarks.PAIRED
            assert rule.network_kind == ("denoiser+causal" if paired else kind)


def _row(setting, method, nfe, tokens_per_second, identical=1.0, batch=1):
    return {"task": "t", "method": method, "setting": setting, "batch": batch,
            "identical": identical, "mean_nfe": nfe, "tokens_per_second": tokens_per_second}


def test_checks_state_each_claim_as_measured():
    rows = [_row("llada (1 token/call)", "mdlm", 10.0, 100.0),
            _row("freedave K=4", "mdlm", 4.0, 80.0),
            _row("ar greedy", "ar", 8.0, 400.0),
            _row("jacobi window 4", "ar", 4.0, 500.0)]
    lines = speculative_benchmarks.checks(rows)
    assert "freedave K=4 on t at batch 1: 0.80x tokens/s, 2.50x fewer calls" in lines[0]
    assert "jacobi window 4 on t at batch 1: 1.25x tokens/s, 2.00x fewer calls" in lines[1]
    # Fewer calls yet slower: named as the case where the drafts' cost eats the gain.
    assert "freedave K=4 batch 1 (0.80x)" in lines[-1] and "jacobi" not in lines[-1]
