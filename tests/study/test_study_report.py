"""A study's results and report (mtseg/study/runner.py's build_results and write_outputs, mtseg/study/report.py),
from fabricated runs, without Ray."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from mtseg import storage
from mtseg.config import arm_configs
from mtseg.study import build_results, render_html, summarize, write_outputs
from mtseg.study.report import arm_table_markdown, claims_tables_markdown, contrast_table_markdown


def _same(a, b) -> bool:
    """Equal as JSON reads them: NaN and None are both "undefined"."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    na = a is None or (isinstance(a, float) and math.isnan(a))
    nb = b is None or (isinstance(b, float) and math.isnan(b))
    if na or nb:
        return na and nb
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return a == b


def test_results_hold_every_run_and_a_summary_anyone_can_recompute(tmp_path, study_cfg, fake_runs):
    cfg = study_cfg()
    results = build_results(cfg, arm_configs(cfg), fake_runs([0, 1, 2]))
    paths = write_outputs(cfg, results)
    assert set(paths) == {"results.json", "results.csv", "runs.csv", "report.html", "metrics.png", "differences.png"}
    assert storage.read_bytes(paths["differences.png"]).startswith(b"\x89PNG")  # no corruptions: no robustness.png
    assert paths["results.json"] == str(tmp_path / "store" / "s" / "results" / "results.json")

    stored = json.loads(storage.read_bytes(paths["results.json"]))  # strict JSON: undefined is null
    assert len(stored["runs"]) == 6 and stored["study"]["seeds"] == [0, 1, 2]
    # The summary is a function of the stored runs.
    again = summarize(
        stored["runs"],
        reference=stored["study"]["reference"],
        keys=stored["summary"]["keys"],
        delta_metrics=stored["study"]["metrics"],
        lower_is_better=stored["study"]["lower_is_better"],
        arms=list(stored["arms"]),
    )
    assert _same(json.loads(json.dumps(again, default=str).replace("NaN", "null")), stored["summary"])
    assert stored["summary"]["keys"] == ["val/miou", "train/miou", "gap/miou", "val/pq", "val/boundary_f1"]
    mtl = stored["summary"]["arms"]["mtl"]
    # The reference has no PQ or boundary F1: no pairs, so undefined; Δm% rests on mIoU alone.
    assert mtl["paired"]["val/pq"]["n"] == 0 and mtl["paired"]["val/miou"]["n"] == 3
    assert mtl["delta_m"]["n"] == 3 and mtl["delta_m"]["mean"] > 0
    assert any(line.startswith("mtl val/pq - single: interval undefined (n=0") for line in stored["flags"])

    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(paths["results.csv"]).decode())))
    assert {(r["arm"], r["metric"]) for r in rows} >= {("single", "val/miou"), ("mtl", "val/miou"), ("mtl", "delta_m")}
    dm = next(r for r in rows if r["metric"] == "delta_m")
    assert float(dm["mean"]) == mtl["delta_m"]["mean"] and dm["n"] == "3"
    run_rows = list(csv.DictReader(io.StringIO(storage.read_bytes(paths["runs.csv"]).decode())))
    assert len(run_rows) == 6 and {"arm", "seed", "checkpoint", "val/miou", "gap/miou"} <= set(run_rows[0])


def test_the_report_has_the_table_the_plots_and_each_arms_config(study_cfg, fake_runs):
    cfg = study_cfg(corruptions="", train_split_limit=8)
    results = json.loads(json.dumps(build_results(cfg, arm_configs(cfg), fake_runs([0, 1, 2], corruptions=("fog", "snow")))))
    # As a study with the corruption suite writes them (the suite itself is not needed to draw).
    results["study"].update(corruptions=["fog", "snow"], severities=[1, 2, 3])
    page = render_html(results)

    assert page.startswith("<!doctype html>") and "<h1>Study s</h1>" in page
    assert "<th>val/miou</th>" in page and "<th>mpc/miou</th>" in page and "<th>Δm%</th>" in page
    assert "single (reference)" in page and "(n=3)" in page
    # Three plots: metrics per arm, paired differences, robustness curves.
    assert page.count('src="data:image/png;base64,') == 3 and "Robustness curves" in page
    configs = {
        arm: yaml.safe_load(html.unescape(text))
        for arm, text in re.findall(r"<h3>(\w+)</h3><p>.*?</p><pre>(.*?)</pre>", page, re.S)
    }
    assert {arm: c["tasks"]["names"] for arm, c in configs.items()} == {
        "single": ["semantic"],
        "mtl": ["semantic", "boundary", "instance"],
    }
    assert all(c["study"]["arms"] == {} for c in configs.values())  # what `mtseg train` takes
    # Every interval that includes 0 is highlighted, in the arm table and against the reference.
    summary = results["summary"]
    highlighted = sum(
        bool(e["includes_zero"])
        for entry in summary["arms"].values()
        for e in [
            *entry["metrics"].values(),
            *(entry["paired"] or {}).values(),
            *([entry["delta_m"]] if entry["delta_m"] else []),
        ]
    )
    assert page.count('class="num zero"') == highlighted
    assert 'class="na num">' in page  # the PQ difference: the reference has no PQ
    md = arm_table_markdown(results)
    assert md.splitlines()[0].startswith("| arm | seeds | val/miou |") and "| single (reference) | 3 |" in md


def test_one_seed_reads_as_undefined_not_as_a_number(study_cfg, fake_runs):
    cfg = study_cfg(seeds=1)
    results = json.loads(json.dumps(build_results(cfg, arm_configs(cfg), fake_runs([0]))).replace("NaN", "null"))
    page = render_html(results)
    assert "(n=1, no interval)" in page and "[NaN, NaN]" in page
    assert "fewer than 3 seeds" in page
    assert page.count('src="data:image/png;base64,') == 2  # no corruption: no robustness curves


def test_contrasts_compare_two_arms_seed_by_seed_and_the_claims_tables_show_every_comparison(tmp_path, study_cfg, fake_runs):
    cfg = study_cfg(contrasts=["mtl - single", "single - mtl"], train_split_limit=8)
    results = json.loads(json.dumps(build_results(cfg, arm_configs(cfg), fake_runs([0, 1, 2], corruptions=("fog",)))))
    summary = results["summary"]
    forward, backward = summary["contrasts"]["mtl - single"], summary["contrasts"]["single - mtl"]
    assert _same(forward, summary["arms"]["mtl"]["paired"])  # the same pairs as against the reference
    assert backward["val/miou"]["mean"] == pytest.approx(-forward["val/miou"]["mean"])
    assert backward["val/miou"]["p_value"] == pytest.approx(forward["val/miou"]["p_value"])
    assert results["study"]["contrasts"] == ["mtl - single", "single - mtl"]
    assert any(line.startswith("mtl - single: val/pq: interval undefined (n=0") for line in results["flags"])

    assert contrast_table_markdown(results).splitlines()[2].startswith("| mtl - single | +0.")
    tables = claims_tables_markdown(results)
    arms, comparisons = tables.split("\n\n")
    head = arms.splitlines()[0]
    assert head.startswith(
        "| arm | seeds | miou ± 95% CI | mPC miou ± 95% CI | rPC miou ± 95% CI | train−val gap miou ± 95% CI |"
    )
    assert head.endswith("| pq ± 95% CI | Δ miou vs single [95% CI] | p |")
    m = summary["arms"]["mtl"]["metrics"]["val/miou"]
    assert f"| mtl | 3 | {m['mean']:.3f} ± {m['half_width']:.3f} |" in arms
    assert "| single (reference) | 3 |" in arms and arms.splitlines()[2].endswith("| – | – |")
    assert [line.split(" | ")[0] for line in comparisons.splitlines()[2:]] == [
        "| mtl - single",
        "| mtl - single",
        "| single - mtl",
    ]
    assert "<h2>Contrasts</h2>" in render_html(results)
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(write_outputs(cfg, results)["results.csv"]).decode())))
    assert {r["metric"] for r in rows if r["arm"] == "single - mtl"} == set(summary["keys"])


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["study-camvid", "study-synth"])
def test_the_readme_shows_the_committed_studies_as_they_came_out(name):
    """README § "Does multi-task help?" and benchmarks/reference/<name>.json (the study's results.json) agree."""
    results = json.loads((ROOT / "benchmarks" / "reference" / f"{name}.json").read_text())
    assert [(r["arm"], r["state"]) for r in results["runs"]].count((results["study"]["reference"], "TERMINATED")) == 3
    assert all(r["state"] == "TERMINATED" for r in results["runs"]) and len(results["runs"]) == 12
    assert claims_tables_markdown(results) in (ROOT / "README.md").read_text()
