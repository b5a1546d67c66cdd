"""The `adaptive` benchmark suite's pieces that need no training: every setting builds its
sampler with the policies it names, QPS is SchED's formula, and the verdicts on hand-made
rows."""

import pytest

from dlm import sampling
from experiments import adaptive_benchmarks


def test_every_setting_builds_with_its_policies_and_bases_come_first():
    rows = adaptive_benchmarks.settings(8)
    seen_bases = set()
    for row in rows:
        rule = sampling.get_sampler(row["sampler"], **row["options"]).rule
        assert rule.network_kind == "denoiser" and rule.block_length == 8
        assert (rule.kv is not None) == (row["cache"] == "dual")
        key = (row["base"], row["cache"])
        if row["method"] == "base":
            assert rule.exit is None and rule.remask is None
            seen_bases.add(key)
        else:
            assert key in seen_bases  # its base was measured first
            assert (rule.exit is not None) == (row["method"] in ("prophet", "sched"))
            assert (rule.remask is not None) == (row["method"] in ("rcr", "backtrack"))
            assert (rule.history is not None) == (row["method"] == "credit")
    assert {r["method"] for r in rows} == {"base", "prophet", "sched", "rcr", "backtrack",
                                           "credit"}


def _row(label, method, accuracy, nfe, tokens_per_second, remasked=0.0, base="llada"):
    return {"task": "t", "label": label, "method": method, "base": base, "cache": "none",
            "accuracy": accuracy, "accuracy_stderr": 0.03, "mean_nfe": nfe,
            "tokens_per_second": tokens_per_second, "mean_remasked": remasked}


def test_qps_is_speedup_times_retained_accuracy_to_the_fourth():
    base = _row("llada", "base", 0.8, 10.0, 100.0)
    assert adaptive_benchmarks.qps(_row("x", "sched", 0.4, 2.0, 400.0), base) == \
        pytest.approx(4.0 * 0.5 ** 4)
    # No reward for beating the base: retained accuracy counts up to 1.
    assert adaptive_benchmarks.qps(_row("x", "sched", 0.9, 2.0, 400.0), base) == \
        pytest.approx(4.0)


def test_checks_state_each_claim_as_measured():
    rows = [_row("llada", "base", 0.80, 10.0, 100.0),
            _row("llada + prophet a", "prophet", 0.79, 2.5, 380.0),
            _row("llada + prophet b", "prophet", 0.50, 1.0, 900.0),  # accuracy lost
            _row("llada + sched a", "sched", 0.80, 2.5, 390.0),
            _row("llada + rcr", "rcr", 0.85, 10.0, 90.0, remasked=3.0)]
    lines = adaptive_benchmarks.checks(rows)
    assert "best at preserved accuracy `llada + prophet a`" in lines[0]
    assert "4.00x fewer network calls (10.0 → 2.5)" in lines[0]
    assert "reproduces" in lines[0]
    assert "3.90x tokens/s, 100.0% of the base accuracy" in lines[1]
    assert "reproduces" in lines[1] and "does not" not in lines[1]
    assert "accuracy 0.850 vs 0.800 (+0.050" in lines[2] and "3.00 tokens re-masked" in lines[2]
    assert "0.90x tokens/s (10.0 → 10.0 calls)" in lines[2]
