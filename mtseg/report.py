"""The run report a person reads: final metrics, training curves and overlays.

:func:`write_report` writes ``report.html``, one self-contained file (the curves and the
overlay images are embedded as PNG data), and ``report.md`` beside it. The curves are drawn
with matplotlib from the run's TensorBoard scalars, one panel per group of tags
(:func:`group_scalars`). An undefined metric (NaN) reads ``n/a`` with the reason.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

#: Width and height of one curve panel, in inches at :data:`DPI`.
PANEL_SIZE = (6.4, 3.6)
DPI = 100


# ---------------------------------------------------------------------------- metrics


def undefined_reason(name: str) -> str:
    """Why metric ``name`` can be undefined (NaN) on a split."""
    if name.rsplit("_", 1)[-1] in ("s", "m", "l"):
        # COCO's small / medium / large area ranges (mask_ap_s, ...): -1 from COCOeval.
        return "no ground-truth objects of this size in the split"
    return "nothing to measure on the split (no ground truth and no prediction of this kind)"


def format_metric(name: str, value: float) -> str:
    """``0.7067``, or ``n/a (<reason>)`` for an undefined (NaN) value."""
    if isinstance(value, float) and math.isnan(value):
        return f"n/a ({undefined_reason(name)})"
    return f"{value:.4f}"


def metrics_table(metrics: dict[str, float]) -> str:
    """A markdown table of the numeric metrics, sorted by name; undefined ones read ``n/a`` with the reason."""
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| `{k}` | {format_metric(k, v)} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    return "\n".join(rows)


# ---------------------------------------------------------------------------- curves


def read_scalars(tensorboard_dir: str) -> dict[str, list[tuple[float, float]]]:
    """All scalar series of a TensorBoard event directory: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(tensorboard_dir):
        return {}
    acc = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags().get("scalars", []):
        # A resumed run rewrites steps after its checkpoint: the last value per step wins.
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return {tag: sorted(v.items()) for tag, v in out.items()}


@dataclass
class Panel:
    """One plot: a group of series (line label -> [(step, value)]) sharing an axis, log-scale when ``log``."""

    title: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]
    log: bool = False


def _fraction(points: list[tuple[float, float]]) -> bool:
    values = [v for _, v in points if not math.isnan(v)]
    return bool(values) and all(0.0 <= v <= 1.0 for v in values)


def group_scalars(scalars: dict[str, list[tuple[float, float]]]) -> list[Panel]:
    """The panels of a run's scalars, grouped by tag, in reading order.

    ``train/loss`` and ``train/loss/<task>`` share a log-scale panel; ``train/weight/<task>``
    share one; the ``val/`` metrics between 0 and 1 (mIoU, F1, AP, PQ, ...) share one; every
    other scalar (learning rate, gradient norm, throughput, a metric in its own units such as
    PSNR) gets a panel of its own. Series with no defined value are left out.
    """
    scalars = {k: v for k, v in scalars.items() if any(math.isfinite(x) for _, x in v)}
    used: set[str] = set()

    def take(tags: list[str]) -> dict[str, list[tuple[float, float]]]:
        used.update(tags)
        return {t: scalars[t] for t in sorted(tags)}

    panels = []
    losses = take([t for t in scalars if t == "train/loss" or t.startswith("train/loss/")])
    if losses:
        series = {("total" if t == "train/loss" else t.removeprefix("train/loss/")): v for t, v in losses.items()}
        panels.append(Panel("training loss", "loss (log scale)", series, log=True))
    weights = take([t for t in scalars if t.startswith("train/weight/")])
    if weights:
        panels.append(Panel("task weights", "weight", {t.removeprefix("train/weight/"): v for t, v in weights.items()}))
    fractions = take([t for t in scalars if t.startswith("val/") and _fraction(scalars[t])])
    if fractions:
        panels.append(Panel("validation", "score (0 to 1)", {t.removeprefix("val/"): v for t, v in fractions.items()}))
    for tag in sorted(t for t in scalars if t not in used):
        log = _wide(scalars[tag])
        panels.append(Panel(tag, tag.rsplit("/", 1)[-1] + (" (log scale)" if log else ""), {tag: scalars[tag]}, log=log))
    return panels


def _wide(points: list[tuple[float, float]]) -> bool:
    """Positive values spanning more than a factor of 20 (a gradient norm falling like the loss): log scale."""
    values = [v for _, v in points if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def plot_panel(panel: Panel):
    """A matplotlib Figure of one :class:`Panel` (no pyplot: no global state, no display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=PANEL_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    styles = ("-", "--", ":", "-.")
    i = 0
    for label, points in panel.series.items():
        steps, values = zip(*points)
        if label == "total":
            ax.plot(steps, values, color="black", marker="o", markersize=2.5, linewidth=2.2, label=label)
            continue
        # Ten colours, then the same colours dashed: every line stays told apart in the legend,
        # and a task has the same colour in the loss and the weight panels (both sorted by name).
        ax.plot(
            steps,
            values,
            linestyle=styles[i // 10 % len(styles)],
            color=f"C{i % 10}",
            marker="o",
            markersize=2.5,
            linewidth=1.4,
            label=label,
        )
        i += 1
    if panel.log:
        ax.set_yscale("log")
    ax.set_title(panel.title)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, which="major", alpha=0.35)
    if panel.log:
        ax.grid(True, which="minor", alpha=0.12)
    if len(panel.series) > 1:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def png_bytes(figure) -> bytes:
    """A matplotlib Figure as PNG bytes (rendered by Agg)."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ---------------------------------------------------------------------------- the report


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1400px;margin:1.5em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 10px;text-align:left}"
    "td.num{font-variant-numeric:tabular-nums}.na{color:#777}"
    ".curves{display:flex;flex-wrap:wrap;gap:8px}img{max-width:100%}"
)


def write_report(
    out_dir: str,
    title: str,
    metrics: dict[str, float],
    scalars: dict[str, list[tuple[float, float]]],
    images: Sequence[str],
    notes: Sequence[str] = (),
) -> tuple[str, str]:
    """Write ``report.md`` and the self-contained ``report.html`` into ``out_dir``.

    Args:
        out_dir: where the two files go (created if needed).
        title: the report's heading.
        metrics: final metrics (``val/miou``, ...); NaN reads ``n/a`` with the reason.
        scalars: the run's curves, tag -> [(step, value)] (:func:`read_scalars`).
        images: PNG files shown under "Overlays" (embedded in the HTML, linked from the markdown).
        notes: paragraphs under the heading.

    Returns:
        ``(report.md path, report.html path)``.
    """
    os.makedirs(out_dir, exist_ok=True)
    md = [f"# {title}", "", *notes, "", "## Final metrics", "", metrics_table(metrics), "", "## Overlays", ""]
    md += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in images]
    md += ["", "Training curves: see report.html (or `tensorboard --logdir` on the run's tensorboard/ directory)."]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")

    body = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(n)}</p>" for n in notes]
    body.append("<h2>Final metrics</h2><table><tr><th>metric</th><th>value</th></tr>")
    for k, v in sorted(metrics.items()):
        if isinstance(v, (int, float)):
            na = isinstance(v, float) and math.isnan(v)
            body.append(
                f'<tr><td><code>{html.escape(k)}</code></td><td class="{"na" if na else "num"}">'
                f"{html.escape(format_metric(k, v))}</td></tr>"
            )
    body.append("</table><h2>Training curves</h2>")
    panels = group_scalars(scalars)
    if not panels:
        body.append("<p>No curves: the run recorded no TensorBoard scalars.</p>")
    body.append('<div class="curves">')
    body += [f'<img alt="{html.escape(p.title)}" src="{_data_uri(png_bytes(plot_panel(p)))}">' for p in panels]
    body.append("</div><h2>Overlays</h2>")
    for p in images:
        with open(p, "rb") as f:
            body.append(f'<p><img alt="{html.escape(os.path.basename(p))}" src="{_data_uri(f.read())}"></p>')
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w") as f:
        f.write(
            f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{_STYLE}</style>\n"
            + "\n".join(body)
            + "\n"
        )
    return md_path, html_path
