"""``mtseg predict``: segment image files with a trained checkpoint (:func:`mtseg.predict.predict_images`)."""

from __future__ import annotations

import argparse

from mtseg.cli import EXIT_FAILED


def cmd_predict(args: argparse.Namespace) -> int:
    """``mtseg predict``: exit 0 when every image ran, 1 when some file or image-less input was skipped."""
    import warnings

    from PIL import Image

    from mtseg import storage
    from mtseg.predict import predict_images

    # PIL warns (two lines) about any image over ~89 Mpixel; predict decodes such an image
    # reduced to --max-image-side and says so in one line. PIL still refuses one over twice that.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    summary = predict_images(
        args.checkpoint,
        args.images,
        args.out,
        device=args.device,
        batch_size=args.batch_size,
        max_image_side=args.max_image_side,
        data_uri=args.data,
        score_threshold=args.score_threshold,
        progress=not args.quiet,
    )
    print(f"[predict] {len(summary.images)} images -> {summary.out} ({len(summary.skipped)} skipped) in {summary.seconds:.1f}s")
    for s in summary.skipped:
        print(f"[predict] skipped {storage.redact(s['error'])}")
    return EXIT_FAILED if summary.skipped else 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mtseg predict``."""
    from mtseg.predict import OVERLAY_SCORE_THRESHOLD

    p = subparsers.add_parser("predict", help="segment image files with a trained checkpoint (PNG overlays + COCO results)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (local or s3://)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR_OR_URI", help="image files, directories or s3:// prefixes")
    p.add_argument("--out", required=True, help="output directory (local or s3://)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the run's data.batch_size)")
    p.add_argument(
        "--max-image-side",
        type=int,
        default=None,
        help="larger images are decoded reduced and downscaled to this side (default: the run's data.max_image_side)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="dataset root to read the label space from, when neither the checkpoint nor the run's data.uri has it",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=OVERLAY_SCORE_THRESHOLD,
        help="lowest instance score outlined in the overlays (the JSON keeps all)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(fn=cmd_predict)
