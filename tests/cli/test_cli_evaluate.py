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
