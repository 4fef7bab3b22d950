"""``mtseg study`` and ``mtseg submit study`` (mtseg/cli/study.py, mtseg/cli/jobs.py, mtseg/submit.py): bad input
fails in one line before Ray, storage or a cluster is touched."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from mtseg import submit
from mtseg.cli import main

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, study: dict) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"train": {"storage_path": str(tmp_path / "store")}, "study": study}))
    return str(path)


def test_a_bad_arm_fails_in_one_line_before_anything_starts(tmp_path, capsys, one_line_error):
    path = _write(tmp_path, {"reference": "a", "arms": {"a": {}, "b": {"weighting.name": "nonsense"}}})
    assert main(["study", "--config", path]) == 2
    one_line_error("study.arms.b: weighting.name: 'nonsense' is not one of")
    assert main(["study", "--config", _write(tmp_path, {})]) == 2
    one_line_error("study.arms: empty")
    with pytest.raises(SystemExit) as e:  # argparse's own refusal
        main(["study", "--config", _write(tmp_path, {"reference": "a", "arms": {"a": {}}}), "--resume", "--restart"])
    assert e.value.code == 2 and "argument --restart: not allowed with argument --resume" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


class _RecordingClient:
    """Stands in for the Jobs API client: records what ``submit`` would send, sends nothing."""

    sent: ClassVar[list[dict]] = []

    def __init__(self, address=None, *, token=None):
        self.address, self.token_source = address, "argument"

    def submit_job(self, **kwargs):
        self.sent.append(kwargs)
        return kwargs["submission_id"]


def test_submit_study_sends_the_entry_script_with_its_options(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(submit, "JobsClient", _RecordingClient)
    monkeypatch.setattr(_RecordingClient, "sent", [])
    args = ["submit", "study", "--config", "jobs/configs/study-synth.yaml", "--address", "http://127.0.0.1:9"]
    assert main([*args, "--resume", "study.seeds=2"]) == 0
    (sent,) = _RecordingClient.sent
    assert sent["entrypoint"] == "python jobs/study.py --config jobs/configs/study-synth.yaml --resume study.seeds=2"
    assert sent["submission_id"].startswith("mtseg-study-study-synth-")
    assert sent["entrypoint_num_cpus"] == 0.0  # the driver only coordinates


def test_submit_study_refuses_a_bad_arm_before_any_cluster_is_contacted(monkeypatch, one_line_error):
    monkeypatch.chdir(REPO)

    def boom(*a, **k):
        raise AssertionError("a cluster was contacted")

    monkeypatch.setattr(submit, "JobsClient", boom)
    args = ["submit", "study", "--config", "jobs/configs/study-synth.yaml", "--address", "http://127.0.0.1:9"]
    assert main([*args, "study.reference=nope"]) == 2
    one_line_error("study.reference: 'nope' is not an arm")
    assert main([*args, "--resume", "--restart"]) == 2
    one_line_error("study: argument --", "not allowed with argument --", "(checked before submission)")
