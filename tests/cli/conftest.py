"""Helpers for the command-line tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_line_error(capsys):
    """``check(*needles)``: the command wrote one ``mtseg: error: ...`` line to stderr, holding every needle."""

    def check(*needles: str) -> str:
        err = capsys.readouterr().err.strip()
        assert err.startswith("mtseg: error: ") and "\n" not in err, err
        for needle in needles:
            assert needle in err, err
        return err

    return check
