"""A study's statistics (mtseg/study/stats.py) against scipy on fixed numbers, and the n = 0, 1, 2 edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mtseg.study.stats import delta_m_per_seed, flags, interval, paired_difference, summarize

REF = {0: 0.50, 1: 0.52, 2: 0.47, 3: 0.55}
ARM = {0: 0.56, 1: 0.55, 2: 0.53, 3: 0.60}


def test_interval_is_the_student_t_interval_over_seeds():
    x = np.array(list(REF.values()))
    out = interval(x)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert out["n"] == 4
    assert out["mean"] == pytest.approx(x.mean())
    assert out["sd"] == pytest.approx(x.std(ddof=1))
    assert out["half_width"] == pytest.approx(half)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert out["includes_zero"] is False
    # Undefined values are left out, not counted as zeros.
    assert interval([*x, math.nan, None])["n"] == 4


def test_interval_with_one_or_no_seed_is_undefined_and_two_seeds_are_computed():
    one = interval([0.5])
    assert one["n"] == 1 and one["mean"] == 0.5
    assert all(math.isnan(one[k]) for k in ("sd", "half_width", "ci_low", "ci_high")) and one["includes_zero"] is None
    none = interval([])
    assert none["n"] == 0 and math.isnan(none["mean"]) and none["includes_zero"] is None
    two = interval([0.4, 0.6])
    assert two["n"] == 2
    assert two["half_width"] == pytest.approx(stats.t.ppf(0.975, 1) * np.std([0.4, 0.6], ddof=1) / math.sqrt(2))
    assert two["half_width"] > 1.0 and two["includes_zero"] is True  # t(0.975, 1) = 12.7: wide


def test_paired_difference_matches_scipys_paired_t_test():
    out = paired_difference(ARM, {**REF, 9: 0.1})  # seed 9 has no pair: left out
    a, r = np.array(list(ARM.values())), np.array(list(REF.values()))
    d = a - r
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert out["seeds"] == [0, 1, 2, 3] and out["n"] == 4
    assert out["values"] == pytest.approx(list(d))
    assert out["mean"] == pytest.approx(d.mean())
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert out["p_value"] == pytest.approx(stats.ttest_rel(a, r).pvalue)
    assert out["p_value"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert out["includes_zero"] is False


def test_paired_difference_edges():
    one = paired_difference({0: 0.6}, {0: 0.5})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1)
    assert math.isnan(one["ci_low"]) and math.isnan(one["p_value"]) and one["includes_zero"] is None
    two = paired_difference({0: 0.6, 1: 0.52}, {0: 0.5, 1: 0.5})
    assert two["n"] == 2 and two["includes_zero"] is True
    assert two["p_value"] == pytest.approx(stats.ttest_rel([0.6, 0.52], [0.5, 0.5]).pvalue)
    # An undefined value on either side drops the pair.
    assert paired_difference({0: 0.6, 1: None}, {0: 0.5, 1: 0.5})["n"] == 1


def test_delta_m_per_seed_and_its_interval():
    arm = {s: {"val/miou": ARM[s], "val/loss": 1.0 + 0.1 * s} for s in ARM}
    ref = {s: {"val/miou": REF[s], "val/loss": 1.2} for s in REF}
    dm = delta_m_per_seed(arm, ref, ["val/miou", "val/loss"], lower_is_better=["val/loss"])
    for s in ARM:
        expected = 100 / 2 * ((ARM[s] - REF[s]) / REF[s] - (1.0 + 0.1 * s - 1.2) / 1.2)
        assert dm[s] == pytest.approx(expected)
    # A reference value that is not positive is left out of the mean (as Δm% of mtseg tune does).
    ref0 = {0: {"val/miou": 0.5, "val/pq": 0.0}}
    assert delta_m_per_seed({0: {"val/miou": 0.6, "val/pq": 0.1}}, ref0, ["val/miou", "val/pq"]) == {0: pytest.approx(20.0)}

    runs = [{"arm": "ref", "seed": s, "metrics": ref[s]} for s in ref]
    runs += [{"arm": "mtl", "seed": s, "metrics": arm[s]} for s in arm]
    summary = summarize(
        runs, reference="ref", keys=["val/miou"], delta_metrics=["val/miou", "val/loss"], lower_is_better=["val/loss"]
    )
    got = summary["arms"]["mtl"]["delta_m"]
    values = np.array([dm[s] for s in sorted(dm)])
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert got["values"] == pytest.approx(list(values)) and got["n"] == 4
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert got["p_value"] == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue)


def test_summarize_orders_arms_compares_with_the_reference_and_flags_intervals_with_zero():
    runs = [{"arm": "mtl", "seed": s, "metrics": {"val/miou": ARM[s], "gap/miou": 0.01 * (s - 1.5)}} for s in ARM]
    runs += [{"arm": "single", "seed": s, "metrics": {"val/miou": REF[s], "gap/miou": 0.02}} for s in REF]
    runs.append({"arm": "mtl", "seed": 7, "state": "ERROR", "metrics": None})  # left out
    runs.append({"arm": "lonely", "seed": 0, "metrics": {"val/miou": 0.5}})  # one seed
    summary = summarize(runs, reference="single", keys=["val/miou", "gap/miou"], delta_metrics=["val/miou"])
    assert list(summary["arms"]) == ["single", "mtl", "lonely"]
    single, mtl, lonely = (summary["arms"][a] for a in ("single", "mtl", "lonely"))
    assert single["paired"] is None and single["delta_m"] is None and single["n_seeds"] == 4
    assert mtl["n_seeds"] == 4 and mtl["metrics"]["val/miou"]["seeds"] == [0, 1, 2, 3]
    assert mtl["paired"]["val/miou"]["p_value"] == pytest.approx(stats.ttest_rel(list(ARM.values()), list(REF.values())).pvalue)
    assert mtl["metrics"]["gap/miou"]["includes_zero"] is True
    lines = flags(summary)
    assert any(line.startswith("mtl gap/miou: ") and line.endswith("includes 0 (n=4)") for line in lines)
    assert any(line.startswith("mtl gap/miou - single: ") and "includes 0" in line for line in lines)
    assert not any(line.startswith("mtl val/miou") for line in lines)  # its intervals are above 0
    assert "lonely val/miou - single: interval undefined (n=1; needs 2 or more seeds)" in lines
    assert "lonely Δm% vs single: interval undefined (n=1; needs 2 or more seeds)" in lines
