"""Pictures and reports a person reads: colour maps, per-task overlays, the run report.

No plotting library is needed: panels are composed with PIL, loss curves are inline SVG.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from mtseg.data.categories import IGNORE_INDEX


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours; index 0 (background) is black, IGNORE_INDEX is grey."""
    rng = np.random.default_rng(12345)
    colours = np.zeros((256, 3), np.uint8)
    base = np.array(
        [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
         [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40], [128, 0, 0]],
        np.uint8,
    )
    for i in range(1, 256):
        colours[i] = base[i - 1] if i - 1 < len(base) else rng.integers(40, 255, 3)
    colours[IGNORE_INDEX] = (128, 128, 128)
    return colours[: max(n, IGNORE_INDEX + 1)]


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8."""
    return palette(256)[np.clip(labels, 0, 255).astype(np.int64)]


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8, min..max mapped black -> yellow."""
    v = values.astype(np.float32)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
    return np.stack([v * 255, v * 220, v * 40], -1).astype(np.uint8)


def to_uint8_image(image_chw: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (np.clip(np.transpose(image_chw, (1, 2, 0)), 0, 1) * 255).round().astype(np.uint8)


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Semantic labels over an image; background pixels stay the image."""
    colour = colorize(labels).astype(np.float32)
    out = image.astype(np.float32)
    fg = (labels > 0)[..., None]
    return np.where(fg, (1 - alpha) * out + alpha * colour, out).astype(np.uint8)


def instance_map(instances: Sequence[dict], shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel instance number (1..N, 0 = none) from fused instances (``mask`` arrays)."""
    out = np.zeros(shape, np.int64)
    for i, inst in enumerate(sorted(instances, key=lambda d: d["score"])):
        mask = np.asarray(inst["mask"], bool)
        if mask.shape == shape:
            out[mask] = i + 1
    return out


def panel(rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]], scale: int = 3) -> Image.Image:
    """A grid of labelled tiles: ``rows`` of (row title, [(tile title, HxWx3 uint8), ...])."""
    tiles = [t for _, r in rows for _, t in r]
    h = max(t.shape[0] for t in tiles) * scale
    w = max(t.shape[1] for t in tiles) * scale
    ncols = max(len(r) for _, r in rows)
    title_h, left = 14, 110
    canvas = Image.new("RGB", (left + ncols * (w + 4), len(rows) * (h + title_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for ri, (row_title, row) in enumerate(rows):
        y = ri * (h + title_h + 4)
        draw.text((4, y + title_h + h // 2 - 6), row_title[:16], fill=(0, 0, 0))
        for ci, (title, tile) in enumerate(row):
            x = left + ci * (w + 4)
            draw.text((x, y), title[:24], fill=(0, 0, 0))
            img = Image.fromarray(tile).resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST)
            canvas.paste(img, (x, y + title_h))
    return canvas


def legend(names: Sequence[str], scale: int = 1) -> Image.Image:
    """Colour legend of category names (class i + 1 has ``names[i]``)."""
    colours = palette(256)
    img = Image.new("RGB", (160 * scale, (len(names) + 1) * 16), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(["background", *names]):
        draw.rectangle([4, i * 16 + 3, 16, i * 16 + 13], fill=tuple(int(c) for c in colours[i]))
        draw.text((22, i * 16 + 2), name, fill=(0, 0, 0))
    return img


def svg_curves(series: dict[str, list[tuple[float, float]]], title: str, width: int = 640, height: int = 260) -> str:
    """An inline SVG line chart of several (step, value) series."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 40
    colours = palette(256)

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
