"""Pictures and reports a person reads: colour maps, per-task overlays, the run report.

No plotting library is needed: panels are composed with PIL, loss curves are inline SVG.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

from mtseg.render import palette


def svg_curves(series: dict[str, list[tuple[float, float]]], title: str, width: int = 640, height: int = 260) -> str:
    """An inline SVG line chart of several (step, value) series."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 40
    colours = palette()

    def xy(p):
        return pad + (p[0] - x0) / (x1 - x0) * (width - 2 * pad), height - pad - (p[1] - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 16 * len(series)}">',
             f'<text x="{pad}" y="16" font-size="13">{html.escape(title)}</text>',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#999"/>',
             f'<text x="2" y="{pad + 4}" font-size="10">{y1:.3g}</text><text x="2" y="{height - pad}" font-size="10">{y0:.3g}</text>',
             f'<text x="{pad}" y="{height - pad + 14}" font-size="10">step {x0:.0f}</text>',
             f'<text x="{width - pad - 50}" y="{height - pad + 14}" font-size="10">step {x1:.0f}</text>']
    for i, (name, s) in enumerate(sorted(series.items())):
        r, g, b = (int(v) for v in colours[i + 1])
        c = f"#{r:02x}{g:02x}{b:02x}"
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(xy, sorted(s)))
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{line}"/>')
        parts.append(f'<text x="{pad}" y="{height + 4 + 16 * i}" font-size="11" fill="{c}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


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


def metrics_table(metrics: dict[str, float]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    return "\n".join(rows)


def write_report(out_dir: str, title: str, metrics: dict[str, float], scalars: dict[str, list[tuple[float, float]]],
                 images: Sequence[str], notes: Sequence[str] = ()) -> tuple[str, str]:
    """``report.md`` and ``report.html`` with the metrics table, loss curves and overlay images."""
    os.makedirs(out_dir, exist_ok=True)
    losses = {k.split("/")[-1]: v for k, v in scalars.items() if k.startswith("train/loss/")}
    weights = {k.split("/")[-1]: v for k, v in scalars.items() if k.startswith("train/weight/")}
    vals = {k: v for k, v in scalars.items() if k in ("val/miou", "val/supercategory_miou", "val/boundary_f1", "val/mask_ap")}
    md = [f"# {title}", "", *notes, "", "## Final metrics", "", metrics_table(metrics), "", "## Overlays", ""]
    md += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in images]
    md += ["", "Loss curves: see report.html (or `tensorboard --logdir` on the run's tensorboard/ directory)."]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    body = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(n)}</p>" for n in notes]
    body.append("<h2>Final metrics</h2><table border=1 cellpadding=4><tr><th>metric</th><th>value</th></tr>")
    body += [f"<tr><td><code>{html.escape(k)}</code></td><td>{v:.4f}</td></tr>" for k, v in sorted(metrics.items())
             if isinstance(v, (int, float))]
    body.append("</table><h2>Curves</h2>")
    body += [svg_curves(losses, "training loss per task"), svg_curves(weights, "task weights"),
             svg_curves(vals, "validation")]
    body.append("<h2>Overlays</h2>")
    body += [f'<p><img src="{html.escape(os.path.relpath(p, out_dir))}"></p>' for p in images]
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w") as f:
        f.write("<!doctype html><meta charset=utf-8><title>" + html.escape(title) + "</title>" + "\n".join(body))
    return md_path, html_path
