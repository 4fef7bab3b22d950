"""A study's statistics over seeds: intervals per arm, paired differences and Δm% against the reference arm.

All intervals are Student-t intervals at :data:`CONFIDENCE` over the seeds that produced the value:

* an arm's metric: ``mean ± t_{0.975, n-1} * sd / sqrt(n)`` of its ``n`` seeds (``sd`` with ``ddof=1``);
* the paired difference of an arm against the reference: ``d_s = M_arm,s - M_ref,s`` for each seed
  ``s`` both have, then the same interval on ``d`` and the paired t-test's p-value
  (``scipy.stats.ttest_rel``, which is the one-sample t-test of ``d`` against 0);
* Δm% of an arm against the reference, per seed (Maninis et al. 2019; :func:`mtseg.tune.objective.delta_m`):
  ``Δm_s = 100 / T * Σ_i (-1)^{l_i} (M_arm,s,i - M_ref,s,i) / M_ref,s,i`` over the ``T`` study metrics
  ``i`` whose reference value is finite and positive (``l_i = 1`` when lower is better), then the
  interval on ``Δm_s`` and its one-sample t-test against 0.

With fewer than two values an interval is undefined (NaN, ``includes_zero`` None); with two it is
computed (and wide: ``t_{0.975, 1} = 12.7``). Nothing here needs Ray or storage: a study's
``results.json`` holds every run's metrics, and :func:`summarize` recomputes its summary from them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mtseg.tune.objective import delta_m

CONFIDENCE = 0.95
#: The key of Δm% in a summary (beside the metric keys).
DELTA_M_KEY = "delta_m"


def _number(value: Any) -> float:
    """A metric value as a float; None (JSON's undefined) and non-numbers are NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def interval(values: Iterable[float], *, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and Student-t confidence interval of ``values`` (non-finite ones are left out).

    Args:
        values: one value per seed.
        confidence: two-sided coverage of the interval.

    Returns:
        ``{"n", "mean", "sd", "half_width", "ci_low", "ci_high", "includes_zero"}``; ``sd`` and the
        interval are NaN and ``includes_zero`` None when ``n < 2``; ``mean`` is NaN when ``n == 0``.
    """
    from scipy import stats

    x = np.array([v for v in map(_number, values) if math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    sd = half = math.nan
    if n >= 2:
        sd = float(x.std(ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    low, high = mean - half, mean + half
    defined = math.isfinite(low) and math.isfinite(high)
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "half_width": half,
        "ci_low": low,
        "ci_high": high,
        "includes_zero": bool(low <= 0.0 <= high) if defined else None,
    }


def _p_one_sample(x: Sequence[float]) -> float:
    from scipy import stats

    if len(x) < 2:
        return math.nan
    with warnings.catch_warnings():  # a zero-variance sample: scipy warns and returns NaN, the answer reported
        warnings.simplefilter("ignore")
        return float(stats.ttest_1samp(np.asarray(x, dtype=np.float64), 0.0).pvalue)


def paired_difference(arm: dict[int, float], reference: dict[int, float], *, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The seed-by-seed difference ``arm - reference``: its interval and the paired t-test.

    Args:
        arm, reference: ``{seed: value}``; only seeds where both are finite are paired.

    Returns:
        :func:`interval`'s keys for the differences, plus ``p_value`` (``scipy.stats.ttest_rel``;
        NaN when ``n < 2`` or the differences do not vary), ``seeds`` and ``values`` (the differences).
    """
    from scipy import stats

    seeds = sorted(s for s in arm if s in reference and math.isfinite(_number(arm[s])) and math.isfinite(_number(reference[s])))
    a = np.array([_number(arm[s]) for s in seeds], dtype=np.float64)
    r = np.array([_number(reference[s]) for s in seeds], dtype=np.float64)
    d = a - r
    out = interval(d, confidence=confidence)
    p = math.nan
    if len(seeds) >= 2:
        with warnings.catch_warnings():  # as in _p_one_sample
            warnings.simplefilter("ignore")
            p = float(stats.ttest_rel(a, r).pvalue)
    return {**out, "p_value": p, "seeds": seeds, "values": [float(v) for v in d]}


def delta_m_per_seed(
    arm: dict[int, dict[str, Any]],
    reference: dict[int, dict[str, Any]],
    metrics: Sequence[str],
    lower_is_better: Iterable[str] = (),
) -> dict[int, float]:
    """Δm% of an arm against the reference for each seed both have (see the module docstring).

    Args:
        arm, reference: ``{seed: {metric: value}}``.
        metrics: the metrics averaged.
        lower_is_better: metrics where a smaller value is better.

    Returns:
        ``{seed: Δm%}``; a seed where no metric has a usable reference value is left out.
    """
    lower = set(lower_is_better)
    out = {}
    for seed in sorted(s for s in arm if s in reference):
        ref = {m: _number(reference[seed].get(m)) for m in metrics}
        base = {m: {"metric": m, "value": v, "higher_is_better": m not in lower} for m, v in ref.items()}
        value = delta_m({m: _number(arm[seed].get(m)) for m in metrics}, base, list(metrics))
        if math.isfinite(value):
            out[seed] = value
    return out


def summarize(
    runs: Sequence[dict[str, Any]],
    *,
    reference: str,
    keys: Sequence[str],
    delta_metrics: Sequence[str],
    lower_is_better: Iterable[str] = (),
    arms: Sequence[str] | None = None,
    contrasts: Sequence[tuple[str, str]] = (),
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Every arm's intervals, paired differences and Δm% (see the module docstring).

    Args:
        runs: ``{"arm", "seed", "metrics": {key: value}}`` per finished run (a ``state`` other
            than ``TERMINATED`` leaves the run out).
        reference: the arm the others are compared with.
        keys: the metric keys summarised.
        delta_metrics: the metrics Δm% averages.
        lower_is_better: metrics where a smaller value is better (for Δm%).
        arms: the arms in the order shown; default the reference, then the others as they come.
        contrasts: more (arm, other) pairs compared like an arm with the reference, seed by seed.

    Returns:
        ``{"confidence", "reference", "keys", "delta_metrics", "lower_is_better", "arms": {arm:
        {"seeds", "n_seeds", "metrics": {key: interval + seeds + values}, "paired": {key: paired
        difference} | None, "delta_m": interval + p_value + seeds + values | None}}}``; the
        reference arm has no ``paired`` or ``delta_m``. With ``contrasts``, also ``"contrasts":
        {"arm - other": {key: paired difference}}``.
    """
    lower = sorted(set(lower_is_better))
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if run.get("state", "TERMINATED") != "TERMINATED" or run.get("metrics") is None:
            continue
        by_arm.setdefault(str(run["arm"]), {})[int(run["seed"])] = run["metrics"]
    order = list(dict.fromkeys([reference, *(arms or []), *by_arm]))
    ref = by_arm.get(reference, {})
    out_arms = {}
    for arm in order:
        seeds = by_arm.get(arm, {})
        metrics = {}
        for key in keys:
            values = {s: _number(m.get(key)) for s, m in seeds.items()}
            finite = sorted(s for s, v in values.items() if math.isfinite(v))
            metrics[key] = {
                **interval((values[s] for s in finite), confidence=confidence),
                "seeds": finite,
                "values": [values[s] for s in finite],
            }
        entry: dict[str, Any] = {
            "seeds": sorted(seeds),
            "n_seeds": len(seeds),
            "metrics": metrics,
            "paired": None,
            "delta_m": None,
        }
        if arm != reference:
            entry["paired"] = {
                key: paired_difference(
                    {s: m.get(key) for s, m in seeds.items()}, {s: m.get(key) for s, m in ref.items()}, confidence=confidence
                )
                for key in keys
            }
            dm = delta_m_per_seed(seeds, ref, delta_metrics, lower)
            entry["delta_m"] = {
                **interval(dm.values(), confidence=confidence),
                "p_value": _p_one_sample(list(dm.values())),
                "seeds": sorted(dm),
                "values": [dm[s] for s in sorted(dm)],
            }
        out_arms[arm] = entry
    out = {
        "confidence": confidence,
        "reference": reference,
        "keys": list(keys),
        "delta_metrics": list(delta_metrics),
        "lower_is_better": lower,
        "arms": out_arms,
    }
    if contrasts:
        out["contrasts"] = {
            f"{a} - {b}": {
                key: paired_difference(
                    {s: m.get(key) for s, m in by_arm.get(a, {}).items()},
                    {s: m.get(key) for s, m in by_arm.get(b, {}).items()},
                    confidence=confidence,
                )
                for key in keys
            }
            for a, b in contrasts
        }
    return out


def _fmt(x: float) -> str:
    return "NaN" if not math.isfinite(x) else f"{x:.4g}"


def flags(summary: dict[str, Any]) -> list[str]:
    """One line per interval that includes 0 or is undefined (fewer than 2 seeds), naming its n: each
    arm's metrics, and its differences and Δm% against the reference.

    Returns:
        e.g. ``"mtl val/pq - ref: 0.012 [-0.004, 0.028] includes 0 (n=3)"``.
    """
    ref = summary["reference"]
    lines = []
    for arm, entry in summary["arms"].items():
        intervals = [(f"{arm} {key}", m) for key, m in entry["metrics"].items()]
        intervals += [(f"{arm} {key} - {ref}", c) for key, c in (entry.get("paired") or {}).items()]
        if entry.get("delta_m") is not None:
            intervals.append((f"{arm} Δm% vs {ref}", entry["delta_m"]))
        if arm == ref:
            intervals += [(f"{name}: {key}", c) for name, by in summary.get("contrasts", {}).items() for key, c in by.items()]
        for what, c in intervals:
            if c["includes_zero"] is None:
                lines.append(f"{what}: interval undefined (n={c['n']}; needs 2 or more seeds)")
            elif c["includes_zero"]:
                lines.append(f"{what}: {_fmt(c['mean'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] includes 0 (n={c['n']})")
    return lines
