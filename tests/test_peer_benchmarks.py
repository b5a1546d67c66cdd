"""The `peer` suite's table from hand-made rounds (the timing itself is the benchmark's)."""

from experiments import peer_benchmarks


def _round(scale: float, with_kv: bool = True) -> dict:
    rows = {key: scale * (i + 1) for i, (key, _, _) in enumerate(peer_benchmarks.ROWS)}
    if not with_kv:
        rows.pop("bd3lm_bs16_kv_cache")
    return rows | {"first_hitting_nfe": 255}


def test_table_medians_over_rounds_and_per_round_ratios():
    dlm = [_round(1.0), _round(3.0), _round(2.0)]
    reference = [_round(2.0, False), _round(2.0, False), _round(4.0, False)]
    lines = dict(zip((key for key, _, _ in peer_benchmarks.ROWS),
                     peer_benchmarks.table(dlm, reference)))
    # MDLM train (row value 1 x scale): dlm median 2.0, reference median 2.0.
    assert lines["mdlm_train_b16"].endswith("| 2.0 | 2.0 | **1.00** (0.50, 1.50, 0.50) |")
    # Rows the reference lacks have no ratio; the call count is read from dlm's rounds.
    assert lines["mdlm_train_b16_plain"].endswith("| — | 4.0 | — |")
    assert lines["bd3lm_bs16_kv_cache"].endswith("| — | 20.0 | — |")
    assert "(255 calls)" in lines["first_hitting"]


def test_table_without_a_reference_lists_dlm_only():
    lines = peer_benchmarks.table([_round(1.0)], [])
    assert all(line.endswith("| — |") for line in lines)
