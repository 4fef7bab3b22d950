"""A study's report: ``report.html``, one self-contained file drawn from ``results.json`` alone.

It shows the arm table (mean and 95% interval per metric, the difference from the reference arm
with its interval and p-value, Δm%), the contrasts between other arms, the intervals that include 0, plots (each metric per arm
with interval whiskers and the seeds' values, the paired differences, robustness curves when
corruptions ran) embedded as PNG, and each arm's exact config. Plots are matplotlib Figures
rendered by Agg (no pyplot, no display).
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any

import yaml

from mtseg.report import png_bytes

#: Inches per plot panel.
PANEL = (3.4, 2.8)
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1400px;margin:1.5em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "td.num{font-variant-numeric:tabular-nums}.zero{background:#fff3cd}.na{color:#777}"
    "pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}img{max-width:100%}"
)


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _fmt(x: Any, digits: int = 4) -> str:
    v = _num(x)
    return "NaN" if not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_interval(entry: dict[str, Any] | None, digits: int = 4) -> str:
    """``0.5120 ± 0.0310 (n=3)``, ``0.5120 (n=1, no interval)`` or ``NaN (n=0)``."""
    if not entry:
        return "–"
    n = entry.get("n", 0)
    if n == 0:
        return "NaN (n=0)"
    if not math.isfinite(_num(entry.get("half_width"))):
        return f"{_fmt(entry['mean'], digits)} (n={n}, no interval)"
    return f"{_fmt(entry['mean'], digits)} ± {_fmt(entry['half_width'], digits)} (n={n})"


def fmt_difference(entry: dict[str, Any] | None, digits: int = 4) -> str:
    """``+0.0120 [-0.0040, 0.0280] p=0.21 (n=3)``; the interval reads NaN when undefined."""
    if not entry:
        return "–"
    p = f" p={_num(entry['p_value']):.3g}" if math.isfinite(_num(entry.get("p_value"))) else ""
    sign = "+" if _num(entry["mean"]) > 0 else ""
    return f"{sign}{_fmt(entry['mean'], digits)} [{_fmt(entry['ci_low'], digits)}, {_fmt(entry['ci_high'], digits)}]{p} (n={entry['n']})"


def arm_table_markdown(results: dict[str, Any]) -> str:
    """The arm table as GitHub markdown: the study metrics per arm, then Δm% against the reference."""
    summary = results["summary"]
    metrics = [m for m in results["study"]["metrics"] if m in summary["keys"]]
    ref = summary["reference"]
    cols = ["arm", "seeds", *metrics, *(f"{m} - {ref}" for m in metrics), "Δm%"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for arm, entry in summary["arms"].items():
        cells = [arm + (" (reference)" if arm == ref else ""), str(entry["n_seeds"])]
        cells += [fmt_interval(entry["metrics"].get(m)) for m in metrics]
        cells += [fmt_difference((entry.get("paired") or {}).get(m)) for m in metrics]
        cells.append(fmt_difference(entry.get("delta_m"), 2) if entry.get("delta_m") else "–")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def contrast_table_markdown(results: dict[str, Any]) -> str:
    """The study's contrasts (``study.contrasts``) as GitHub markdown, one row each; empty without any."""
    summary = results["summary"]
    contrasts = summary.get("contrasts") or {}
    if not contrasts:
        return ""
    metrics = [m for m in results["study"]["metrics"] if m in summary["keys"]]
    lines = ["| comparison | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for name, by in contrasts.items():
        lines.append("| " + " | ".join([name, *(fmt_difference(by.get(m)) for m in metrics)]) + " |")
    return "\n".join(lines) + "\n"


def _headline(metric: str, extra_splits: list[str]) -> list[tuple[str, str]]:
    """The (key, column title) of a metric's headline figures: clean, robustness, generalisation."""
    name = metric.split("/", 1)[1]
    return [
        (metric, name),
        (f"mpc/{name}", f"mPC {name}"),
        (f"rpc/{name}", f"rPC {name}"),
        *((f"{split}/{name}", f"{split} {name}") for split in extra_splits),
        (f"gap/{name}", f"train−val gap {name}"),
    ]


def claims_tables_markdown(results: dict[str, Any], metric: str = "val/miou", also: tuple[str, ...] = ("val/pq",)) -> str:
    """The answer to "does it help?" in two GitHub markdown tables, from ``results.json`` alone.

    The first has one row per arm: each headline figure of ``metric`` (clean, mPC and rPC under
    the corruptions, each extra split, the train−val gap) and of ``also``, mean ± the interval's
    half-width, then ``metric``'s paired difference from the reference with its interval and
    p-value. The second has one row per comparison (each arm against the reference, then the
    study's contrasts) and the paired difference of each headline figure. Figures the study did
    not measure are left out; an arm without one reads "–".
    """
    summary, study = results["summary"], results["study"]
    keys = set(summary["keys"])
    conf = int(round(100 * summary.get("confidence", 0.95)))
    ref = summary["reference"]
    columns = [(k, t) for k, t in _headline(metric, study.get("extra_splits") or []) if k in keys]
    columns += [(m, m.split("/", 1)[1]) for m in also if m in keys]
    name = metric.split("/", 1)[1]
    head = ["arm", "seeds", *(f"{t} ± {conf}% CI" for _, t in columns), f"Δ {name} vs {ref} [{conf}% CI]", "p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, entry in summary["arms"].items():
        cells = [arm + (" (reference)" if arm == ref else ""), str(entry["n_seeds"])]
        for key, _ in columns:
            m = entry["metrics"].get(key)
            cells.append(f"{_fmt(m['mean'], 3)} ± {_fmt(m['half_width'], 3)}" if m and m.get("n") else "–")
        diff = (entry.get("paired") or {}).get(metric)
        if diff:
            sign = "+" if _num(diff["mean"]) > 0 else ""
            cells += [f"{sign}{_fmt(diff['mean'], 3)} [{_fmt(diff['ci_low'], 3)}, {_fmt(diff['ci_high'], 3)}]"]
            cells += [f"{_num(diff['p_value']):.2g}" if math.isfinite(_num(diff["p_value"])) else "–"]
        else:
            cells += ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")

    comparisons = [(f"{a} - {ref}", e["paired"]) for a, e in summary["arms"].items() if e.get("paired")]
    comparisons += list((summary.get("contrasts") or {}).items())
    if comparisons:
        head = ["comparison", *(f"Δ {t} [{conf}% CI], p" for _, t in columns)]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for title, by in comparisons:
            cells = [title]
            for key, _ in columns:
                d = by.get(key)
                if not d or not d.get("n"):
                    cells.append("–")
                    continue
                p = f", p={_num(d['p_value']):.2g}" if math.isfinite(_num(d.get("p_value"))) else ""
                sign = "+" if _num(d["mean"]) > 0 else ""
                zero = " (includes 0)" if d.get("includes_zero") else ""
                cells.append(f"{sign}{_fmt(d['mean'], 3)} [{_fmt(d['ci_low'], 3)}, {_fmt(d['ci_high'], 3)}]{p}{zero}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots


def _figure(panels: int):
    from matplotlib.figure import Figure

    cols = min(3, max(1, panels))
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes


def _whiskers(ax, xs: list[int], entries: list[dict[str, Any]], color: str) -> None:
    """Per-seed values as dots, the mean as a square with its interval as whiskers; "no values" when none."""
    ax.set_xlim(-0.6, len(xs) - 0.4)
    ax.ticklabel_format(axis="y", useOffset=False)
    if not any(e.get("values") for e in entries):
        ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="gray")
    for x, e in zip(xs, entries):
        values = [_num(v) for v in e.get("values", [])]
        if values:
            jitter = [x + 0.08 * (i - (len(values) - 1) / 2) for i in range(len(values))]
            ax.scatter(jitter, values, s=12, color="0.55", zorder=2)
        mean, half = _num(e.get("mean")), _num(e.get("half_width"))
        if math.isfinite(mean):
            ax.errorbar(
                [x], [mean], yerr=[[half]] * 2 if math.isfinite(half) else None, fmt="s", color=color, capsize=5, zorder=3
            )


def plot_metrics(results: dict[str, Any]):
    """Each summarised metric per arm: seeds' values, mean and 95% interval. None when nothing to draw."""
    summary = results["summary"]
    keys, arms = summary["keys"], list(summary["arms"])
    if not keys or not arms:
        return None
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        _whiskers(ax, list(range(len(arms))), [summary["arms"][a]["metrics"].get(key, {}) for a in arms], "C0")
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set_title(key, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.35)
    return fig


def plot_differences(results: dict[str, Any]):
    """Each study metric's (and Δm%'s) paired difference per arm from the reference, then per
    contrast (``study.contrasts``); the first metric's mPC, rPC, extra splits and train−val gap too.
    None when there is nothing to compare."""
    summary = results["summary"]
    ref = summary["reference"]
    others = [a for a, e in summary["arms"].items() if e.get("paired") is not None]
    contrasts = summary.get("contrasts") or {}
    labels = [f"{a} − {ref}" for a in others] + [name.replace(" - ", " − ") for name in contrasts]
    if not labels:
        return None
    study_metrics = results["study"]["metrics"]
    # Each study metric, and the first one's robustness and generalisation figures beside it.
    headline = [k for k, _ in _headline(study_metrics[0], results["study"].get("extra_splits") or [])] if study_metrics else []
    metrics = [m for m in dict.fromkeys([*headline, *study_metrics]) if m in summary["keys"]]
    panels = [
        (m, [summary["arms"][a]["paired"].get(m, {}) for a in others] + [by.get(m, {}) for by in contrasts.values()])
        for m in metrics
    ]
    panels.append((f"Δm% vs {ref}", [summary["arms"][a]["delta_m"] or {} for a in others] + [{}] * len(contrasts)))
    fig, axes = _figure(len(panels))
    for ax, (title, entries) in zip(axes, panels):
        ax.axhline(0.0, color="k", lw=0.8)
        _whiskers(ax, list(range(len(labels))), entries, "C1")
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize="small")
        ax.set_title(f"{title}: paired difference" if not title.startswith("Δm") else title, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.35)
    return fig


def _severity_value(by_corruption: dict, severity: int, metric: str) -> float:
    """Mean over the corruptions of ``metric`` at ``severity`` (JSON keys are strings)."""
    values = []
    for per_severity in by_corruption.values():
        m = per_severity.get(str(severity)) or per_severity.get(severity) or {}
        v = _num(m.get(metric, m.get(metric.split("/", 1)[-1])))
        if math.isfinite(v):
            values.append(v)
    return sum(values) / len(values) if values else math.nan


def plot_robustness(results: dict[str, Any]):
    """Each study metric against corruption severity (0 = clean), averaged over the corruptions, one
    line per arm with its 95% interval over seeds as a band. None when no corruption ran."""
    from mtseg.study.stats import interval

    runs = [r for r in results["runs"] if r.get("robustness")]
    severities = results["study"].get("severities") or []
    if not runs or not severities:
        return None
    metrics = results["study"]["metrics"]
    xs = [0, *severities]
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        for i, arm in enumerate(results["summary"]["arms"]):
            mine = [r for r in runs if r["arm"] == arm]
            if not mine:
                continue
            per_x = []
            for s in xs:
                values = [
                    _num((r.get("splits") or {}).get("val", {}).get(metric))
                    if s == 0
                    else _severity_value(r["robustness"]["by_corruption"], s, metric)
                    for r in mine
                ]
                per_x.append(interval(values))
            means = [_num(e["mean"]) for e in per_x]
            if not any(math.isfinite(m) for m in means):
                continue
            ax.plot(xs, means, marker="o", color=f"C{i}", label=arm)
            low, high = [_num(e["ci_low"]) for e in per_x], [_num(e["ci_high"]) for e in per_x]
            if all(math.isfinite(v) for v in low + high):
                ax.fill_between(xs, low, high, color=f"C{i}", alpha=0.15)
        ax.set_xticks(xs, ["clean", *map(str, severities)])
        ax.set_xlabel("severity")
        ax.set_title(metric, fontsize="medium")
        ax.grid(True, alpha=0.35)
        ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------- the page


#: The report's plots, also written beside it as PNG files: (file name, title, drawing function).
FIGURES = (
    ("metrics.png", "metrics per arm", plot_metrics),
    ("differences.png", "paired differences", plot_differences),
    ("robustness.png", "robustness curves", plot_robustness),
)


def figures(results: dict[str, Any]) -> dict[str, bytes]:
    """The report's plots as PNG bytes by file name (a plot with nothing to draw is left out)."""
    out = {}
    for name, _, draw in FIGURES:
        fig = draw(results)
        if fig is not None:
            out[name] = png_bytes(fig)
    return out


def _img(fig, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="{uri}"></p>'


def _cell(text: str, *, zero: bool | None = None) -> str:
    cls = "na num" if "NaN" in text else "num zero" if zero else "num"
    return f'<td class="{cls}">{html.escape(text)}</td>'


def _override(value: Any) -> str:
    # As one would type it after `mtseg train`: [semantic, boundary], not ['semantic', 'boundary'].
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def render_html(results: dict[str, Any]) -> str:
    """The report of ``results`` (the content of ``results.json``) as one HTML page.

    Args:
        results: from :func:`mtseg.study.runner.build_results`, or read back from ``results.json``.

    Returns:
        The HTML text; intervals that include 0 are highlighted, undefined ones read NaN.
    """
    study, summary = results["study"], results["summary"]
    ref, keys = summary["reference"], summary["keys"]
    conf = int(round(100 * summary.get("confidence", 0.95)))
    n_seeds = {a: e["n_seeds"] for a, e in summary["arms"].items()}
    title = f"Study {study['name']}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    notes = [
        f"{len(summary['arms'])} arms x seeds {', '.join(map(str, study['seeds']))}; reference arm {ref}. "
        f"Finished runs per arm: {', '.join(f'{a} {n}' for a, n in n_seeds.items())}.",
        f"Intervals: Student t at {conf}% over seeds (mean ± half-width). Differences are paired seed by seed "
        f"(arm − {ref}), with the paired t-test's p-value. Δm% per seed = mean over {', '.join(study['metrics'])} of "
        f"(−1)^lower_is_better × (M_arm − M_ref) / M_ref × 100 (metrics whose reference value is not positive are left out), "
        "then its interval over seeds. With one seed an interval is undefined (NaN); with two it is very wide.",
    ]
    if any(0 < n < 3 for n in n_seeds.values()):
        notes.append("Some arms have fewer than 3 seeds: their intervals rest on that n and are weak evidence.")
    body += [f"<p>{html.escape(n)}</p>" for n in notes]
    failed = [r for r in results["runs"] if r.get("state") != "TERMINATED"]
    if failed:
        body.append(
            "<p>Runs left out (not finished): "
            + html.escape(", ".join(f"{r['arm']} seed {r['seed']} ({r.get('state')})" for r in failed))
            + "</p>"
        )

    body.append(
        "<h2>Arms</h2><table><tr><th>arm</th><th>seeds</th>"
        + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        + "<th>Δm%</th></tr>"
    )
    for arm, entry in summary["arms"].items():
        row = f"<tr><td>{html.escape(arm)}{' (reference)' if arm == ref else ''}</td><td class=num>{entry['n_seeds']}</td>"
        row += "".join(
            _cell(fmt_interval(entry["metrics"].get(k)), zero=(entry["metrics"].get(k) or {}).get("includes_zero")) for k in keys
        )
        dm = entry.get("delta_m")
        row += _cell(fmt_difference(dm, 2), zero=dm["includes_zero"]) if dm else "<td>–</td>"
        body.append(row + "</tr>")
    body.append("</table>")

    others = [(a, e) for a, e in summary["arms"].items() if e.get("paired") is not None]
    if others:
        body.append(f"<h2>Against the reference ({html.escape(ref)})</h2>")
        body.append(
            f"<p>Paired difference arm − {html.escape(ref)} [{conf}% interval], p-value, pairs. Highlighted: the interval includes 0.</p>"
        )
        body.append("<table><tr><th>metric</th>" + "".join(f"<th>{html.escape(a)}</th>" for a, _ in others) + "</tr>")
        for k in keys:
            body.append(
                f"<tr><td>{html.escape(k)}</td>"
                + "".join(
                    _cell(fmt_difference(e["paired"].get(k)), zero=(e["paired"].get(k) or {}).get("includes_zero"))
                    for _, e in others
                )
                + "</tr>"
            )
        body.append("</table>")
    contrasts = summary.get("contrasts") or {}
    if contrasts:
        body.append("<h2>Contrasts</h2>")
        body.append(f"<p>Paired difference a − b [{conf}% interval], p-value, pairs. Highlighted: the interval includes 0.</p>")
        body.append("<table><tr><th>metric</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in contrasts) + "</tr>")
        for k in keys:
            body.append(
                f"<tr><td>{html.escape(k)}</td>"
                + "".join(
                    _cell(fmt_difference(by.get(k)), zero=(by.get(k) or {}).get("includes_zero")) for by in contrasts.values()
                )
                + "</tr>"
            )
        body.append("</table>")
    if results.get("flags"):
        body.append("<h3>Intervals that include 0 or are undefined</h3><ul>")
        body += [f"<li>{html.escape(line)}</li>" for line in results["flags"]]
        body.append("</ul>")

    body.append("<h2>Plots</h2>")
    for _, name, fn in FIGURES:
        fig = fn(results)
        if fig is not None:
            body.append(f"<h3>{html.escape(name[0].upper() + name[1:])}</h3>" + _img(fig, name))

    body.append("<h2>Runs</h2><table><tr><th>arm</th><th>seed</th><th>state</th><th>trial</th><th>checkpoint</th>")
    body[-1] += "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
    for r in results["runs"]:
        m = r.get("metrics") or {}
        body.append(
            f"<tr><td>{html.escape(str(r['arm']))}</td><td class=num>{r['seed']}</td><td>{html.escape(str(r.get('state')))}</td>"
            f"<td>{html.escape(str(r.get('trial')))}</td><td><code>{html.escape(str(r.get('checkpoint') or ''))}</code></td>"
            + "".join(_cell(_fmt(m.get(k)), zero=False) for k in keys)
            + "</tr>"
        )
    body.append("</table>")

    body.append("<h2>Arm configs</h2>")
    for arm, a in results["arms"].items():
        overrides = ", ".join(f"{k}={_override(v)}" for k, v in a.get("overrides", {}).items()) or "none"
        body.append(
            f"<h3>{html.escape(arm)}</h3><p>Overrides: <code>{html.escape(overrides)}</code>; train.seed is each run's "
            f"({', '.join(map(str, study['seeds']))}).</p><pre>{html.escape(a['config'])}</pre>"
        )
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{_STYLE}</style>\n"
        + "\n".join(body)
        + "\n"
    )
