"""mtseg.report: metrics a person reads (n/a with a reason), matplotlib curves, one self-contained HTML file."""

from __future__ import annotations

import base64
import io
import math
import re

import numpy as np
from PIL import Image

from mtseg.report import format_metric, group_scalars, metrics_table, plot_panel, read_scalars, write_report

# A run's scalars as the trainer logs them: the first loss a hundred times the last.
SCALARS = {
    "train/loss": [(5, 11.5), (10, 3.0), (15, 0.4), (20, 0.06)],
    "train/loss/alpha": [(5, 9.0), (10, 2.0), (15, 0.3), (20, 0.05)],
    "train/loss/beta": [(5, 2.5), (10, 1.0), (15, 0.1), (20, 0.01)],
    "train/weight/alpha": [(5, 0.5), (20, 0.6)],
    "train/weight/beta": [(5, 0.5), (20, 0.4)],
    "train/lr": [(5, 0.001), (10, 0.003), (20, 0.002)],
    "train/grad_norm": [(5, 120.0), (20, 1.5)],
    "val/miou": [(10, 0.3), (20, 0.7)],
    "val/mask_ap": [(10, 0.1), (20, 0.2)],
    "val/mask_ap_s": [(10, math.nan), (20, math.nan)],
    "val/psnr": [(10, 14.0), (20, 18.5)],
}


def test_undefined_metrics_read_n_a_with_the_reason():
    assert format_metric("val/miou", 0.70674) == "0.7067"
    assert format_metric("val/mask_ap_s", math.nan) == "n/a (no ground-truth objects of this size in the split)"
    assert format_metric("val/psnr", math.nan).startswith("n/a (nothing to measure")
    table = metrics_table({"val/miou": 0.5, "val/mask_ap_s": math.nan, "note": "text"})
    assert "nan" not in table and "| `val/mask_ap_s` | n/a (" in table and "note" not in table
    assert table.splitlines()[2] == "| `val/mask_ap_s` | n/a (no ground-truth objects of this size in the split) |"


def test_scalars_are_grouped_into_panels_losses_on_a_log_scale():
    panels = {p.title: p for p in group_scalars(SCALARS)}
    assert list(panels) == ["training loss", "task weights", "validation", "train/grad_norm", "train/lr", "val/psnr"]
    loss = panels["training loss"]
    assert loss.log and set(loss.series) == {"total", "alpha", "beta"}
    assert set(panels["task weights"].series) == {"alpha", "beta"} and not panels["task weights"].log
    # Fractions share a panel; PSNR (dB) has its own axis; an all-undefined series is left out.
    assert set(panels["validation"].series) == {"miou", "mask_ap"}
    assert panels["train/grad_norm"].log and not panels["train/lr"].log


def test_a_panel_has_labelled_axes_ticks_and_a_legend():
    loss = group_scalars(SCALARS)[0]
    ax = plot_panel(loss).axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "optimiser step" and "loss" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["total", "alpha", "beta"]
    assert len({line.get_color() for line in ax.get_lines()}) == 3
    weights = plot_panel(group_scalars(SCALARS)[1]).axes[0]
    assert [line.get_color() for line in weights.get_lines()] == [line.get_color() for line in ax.get_lines()[1:]]
    low, high = ax.get_ylim()
    assert low <= 0.01 and high >= 11.5  # from the first step to the last, not flattened
    assert len([t for t in ax.get_yticks() if low <= t <= high]) >= 3  # decades, not just min and max
    val = plot_panel(group_scalars(SCALARS)[2]).axes[0]
    assert val.get_yscale() == "linear" and len(val.get_yticks()) >= 4


def test_report_html_is_one_self_contained_file(tmp_path):
    overlay = tmp_path / "overlay.png"
    Image.fromarray(np.full((12, 20, 3), 200, np.uint8)).save(overlay)
    md, page = write_report(
        str(tmp_path / "report"),
        "a <run>",
        {"val/miou": 0.7, "val/mask_ap_s": math.nan},
        SCALARS,
        [str(overlay)],
        notes=["two workers"],
    )
    text = open(page).read()
    assert "<title>a &lt;run&gt;</title>" in text and "<p>two workers</p>" in text
    assert ">n/a (no ground-truth objects" in text and ">nan<" not in text
    # Nothing outside the file: every image is inline PNG data, no URL or path is fetched.
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 6 + 1 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    pictures = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in sources]
    assert pictures[-1].size == (20, 12) and all(p.width >= 600 for p in pictures[:-1])
    assert "| `val/miou` | 0.7000 |" in open(md).read()


def test_report_without_curves_says_so(tmp_path):
    _, page = write_report(str(tmp_path), "empty", {}, {}, [])
    assert "No curves" in open(page).read()


def test_read_scalars_from_tensorboard_events_last_value_per_step_wins(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step, value in ((1, 3.0), (2, 2.0), (2, 1.5)):  # a resumed run rewrites step 2
        writer.add_scalar("train/loss", value, step)
    writer.close()
    assert read_scalars(str(tmp_path)) == {"train/loss": [(1, 3.0), (2, 1.5)]}
    assert read_scalars(str(tmp_path / "none")) == {}
