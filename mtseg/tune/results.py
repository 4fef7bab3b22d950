"""What a search leaves: the trial table (CSV, markdown) and the best config as a ``mtseg train`` YAML."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass
from typing import Any

from mtseg import storage
from mtseg.config import Config, TuneConfig, to_yaml
from mtseg.tune.objective import DELTA_M, _finite
from mtseg.tune.space import RESULTS_DIR, Param, experiment_uri, trial_config


@dataclass
class TuneOutcome:
    """What a finished search produced: the trial rows (best first), the best row and its
    ``mtseg train`` config, the URIs written, the Δm% baselines, and Tune's ``ResultGrid``."""

    rows: list[dict]
    best: dict | None
    best_config: Config | None
    paths: dict[str, str]
    baselines: dict
    markdown: str = ""
    grid: Any = None


def summarize(results, cfg: Config, params: dict[str, Param]) -> list[dict]:
    """One row per trial: id, state, epochs run, its config, and the metrics of its best epoch
    by ``tune.metric``; best first, trials without the metric last."""
    metric, sign = cfg.tune.metric, (1.0 if cfg.tune.mode == "max" else -1.0)
    rows = []
    for r in results:
        df = r.metrics_dataframe
        best_row: dict = {}
        epochs_run = 0
        if df is not None and len(df):
            if "train/epoch" in df:
                epochs_run = int(df["train/epoch"].max())
            if metric in df and df[metric].notna().any():
                best_row = df.loc[(df[metric] * sign).idxmax()].to_dict()
        trial_id = (r.metrics or {}).get("trial_id") or os.path.basename(str(r.path)).removeprefix("trial_")
        state = "ERROR" if r.error is not None else "TERMINATED" if epochs_run >= cfg.train.epochs else "STOPPED"
        row = {"trial": trial_id, "state": state, "epochs": epochs_run}
        row.update({k: (r.config or {}).get(k) for k in params})
        for key in dict.fromkeys((metric, "val/miou", "val/mask_ap", DELTA_M)):
            value = best_row.get(key)
            row[key] = float(value) if _finite(value) else None
        row["checkpoint"] = best_row.get("checkpoint_uri")
        rows.append(row)
    rows.sort(key=lambda row: (row[metric] is None, -sign * (row[metric] or 0.0)))
    if metric != DELTA_M and all(row[DELTA_M] is None for row in rows):
        for row in rows:
            del row[DELTA_M]  # no baselines: no column
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def to_markdown(rows: list[dict]) -> str:
    """The trial table as GitHub markdown."""
    if not rows:
        return "(no trials)\n"
    cols = [c for c in rows[0] if c != "checkpoint"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]).replace("|", "\\|") for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    """The trial table as CSV (lists written as JSON)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else ("" if v is None else v) for k, v in row.items()}
            )
    return buf.getvalue()


def best_train_config(cfg: Config, row: dict, params: dict[str, Param]) -> Config:
    """The best trial's config (for PBT its last mutated values) as a standalone ``mtseg train``
    config, run name ``<experiment_name>-best``, no search section."""
    base = cfg.to_dict()
    base["tune"] = dataclasses.asdict(TuneConfig())
    out = trial_config(base, {k: row[k] for k in params if row.get(k) is not None})
    out.train.run_name = f"{cfg.tune.experiment_name}-best"
    return out


def write_results(cfg: Config, rows: list[dict], params: dict[str, Param], baselines: dict) -> TuneOutcome:
    """Write the trial table (CSV, markdown) and the best config under the experiment's results/."""
    root = storage.join(experiment_uri(cfg), RESULTS_DIR)
    md = to_markdown(rows)
    paths = {"csv": storage.join(root, "trials.csv"), "markdown": storage.join(root, "trials.md")}
    storage.write_bytes(paths["csv"], to_csv(rows).encode())
    storage.write_bytes(paths["markdown"], md.encode())
    best = next((r for r in rows if r[cfg.tune.metric] is not None and r["state"] != "ERROR"), None)
    best_cfg = None
    if best is not None:
        best_cfg = best_train_config(cfg, best, params)
        paths["best_config"] = storage.join(root, "best.yaml")
        header = (
            f"# Best trial {best['trial']} of experiment {cfg.tune.experiment_name}: "
            f"{cfg.tune.metric}={best[cfg.tune.metric]:.4f}\n# mtseg train --config best.yaml\n"
        )
        storage.write_bytes(paths["best_config"], (header + to_yaml(best_cfg)).encode())
    if baselines:
        storage.write_bytes(storage.join(root, "baselines.json"), json.dumps(baselines, indent=2).encode())
    return TuneOutcome(rows=rows, best=best, best_config=best_cfg, paths=paths, baselines=baselines, markdown=md)
