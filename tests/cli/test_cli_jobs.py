"""``mtseg submit`` / ``mtseg jobs`` (mtseg/cli/jobs.py): a job's arguments are checked with the
parser of the ``mtseg`` command it runs, before anything reaches a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtseg import submit
from mtseg.cli import main
from mtseg.cli.jobs import check_arguments

REPO = Path(__file__).resolve().parents[2]


def test_check_arguments_uses_the_parser_of_the_jobs_command():
    check_arguments("evaluate", ["--checkpoint", "s3://bucket/runs/demo", "--split", "val2017"])
    check_arguments("prepare", ["--anything"])  # prepare runs no mtseg command of its own: nothing to check
    with pytest.raises(submit.SubmitError) as e:
        check_arguments("evaluate", ["--split", "val2017"])
    assert str(e.value) == "evaluate: the following arguments are required: --checkpoint (checked before submission)"
    with pytest.raises(submit.SubmitError, match=r"^train: unrecognized arguments: --nope \(checked before submission\)$"):
        check_arguments("train", ["--config", "jobs/configs/demo.yaml", "--nope"])


def test_submit_checks_the_job_arguments_before_any_cluster_is_contacted(monkeypatch, one_line_error):
    monkeypatch.chdir(REPO)

    def boom(*a, **k):
        raise AssertionError("a cluster was contacted")

    monkeypatch.setattr(submit, "JobsClient", boom)
    assert main(["submit", "evaluate", "--address", "http://127.0.0.1:9", "--", "--split", "val2017"]) == 2
    one_line_error("evaluate: the following arguments are required: --checkpoint (checked before submission)")
