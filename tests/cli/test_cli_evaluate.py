"""``mtseg evaluate`` (mtseg/cli/evaluate.py): bad input is one line and exit 2, before Ray starts."""

from __future__ import annotations

import pytest

from mtseg.cli import main


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--limit", "0"], "--limit: must be >= 1, got 0"),
    ],
)
def test_zero_is_refused_not_replaced_by_the_default(tmp_path, one_line_error, args, needle):
    assert main(["evaluate", *args, "--checkpoint", str(tmp_path / "no-checkpoint")]) == 2
    one_line_error(needle)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--corruptions", "fog,speckle_noise"], ["--corruptions: unknown speckle_noise", "gaussian_noise, shot_noise"]),
        (["--corruptions", "all", "--severities", "0,2"], ["--severities: got 0", "expected 1-5"]),
        (["--corruptions", "fog", "--severities", "1-9"], ["--severities: got 6, 7, 8, 9"]),
        (["--severities", "2"], ["--severities: only with --corruptions"]),
    ],
)
def test_bad_corruptions_and_severities_fail_before_ray_starts(tmp_path, monkeypatch, one_line_error, args, needles):
    import mtseg.cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a command that was bound to fail")

    monkeypatch.setattr(mtseg.cluster, "init_local_ray", no_ray)
    # The checkpoint does not exist either: the corruptions are checked first.
    assert main(["evaluate", "--checkpoint", str(tmp_path / "no-checkpoint"), *args]) == 2
    one_line_error(*needles)
