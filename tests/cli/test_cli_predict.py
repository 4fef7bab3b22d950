"""``mtseg predict`` (mtseg/cli/predict.py): bad input is one line and exit 2, before the model loads."""

from __future__ import annotations

import pytest

from mtseg.cli import main


def test_predict_out_that_is_a_file_fails_before_the_model_loads(tmp_path, one_line_error):
    image, out = tmp_path / "a.png", tmp_path / "out"
    image.write_bytes(b"")
    out.write_text("an existing file")
    # The checkpoint does not exist either: the --out check comes first, before any loading.
    assert main(["predict", "--checkpoint", str(tmp_path / "no-checkpoint"), str(image), "--out", str(out)]) == 2
    one_line_error(f"--out {out}: {out} is a file, not a directory")
    assert out.read_text() == "an existing file"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--max-image-side", "0"], "--max-image-side: must be >= 16, got 0"),
    ],
)
def test_zero_is_refused_not_replaced_by_the_default(tmp_path, one_line_error, args, needle):
    (tmp_path / "image").write_bytes(b"")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "image"),
                "--out",
                str(tmp_path / "out"),
                *args,
                "--checkpoint",
                str(tmp_path / "no-checkpoint"),
            ]
        )
        == 2
    )
    one_line_error(needle)
