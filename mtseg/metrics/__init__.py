"""Evaluation metrics: accumulators with reset / update / compute that combine across workers.

- :class:`ConfusionMatrix` (mIoU, pixel accuracy), :class:`BoundaryF1`, :class:`PSNR`
  (:mod:`mtseg.metrics.dense`);
- :class:`CocoMaskEvaluator`: official pycocotools mask AP with per-image matching in
  parallel (:mod:`mtseg.metrics.coco`);
- :class:`PanopticQuality` over things and stuff, as panopticapi computes it, and COCO's
  panoptic PNG + JSON format (:mod:`mtseg.metrics.panoptic`);
- :class:`Evaluator`: the validation metrics of a multi-task model in one dict.
"""

from mtseg.metrics.coco import (
    CocoMaskEvaluator,
    coco_gt_from_rows,
    evaluate_image_shard,
    masks_to_coco_results,
    merge_eval_imgs,
    ray_map,
)
from mtseg.metrics.dense import PSNR, BoundaryF1, ConfusionMatrix
from mtseg.metrics.evaluator import Evaluator
from mtseg.metrics.panoptic import (
    PanopticQuality,
    gt_segments_from_coco,
    id2rgb,
    read_panoptic_png,
    rgb2id,
    segments_from_panoptic,
    segments_from_results,
    segments_to_panoptic,
    write_panoptic_png,
)

__all__ = [
    "BoundaryF1",
    "CocoMaskEvaluator",
    "ConfusionMatrix",
    "Evaluator",
    "PSNR",
    "PanopticQuality",
    "coco_gt_from_rows",
    "evaluate_image_shard",
    "gt_segments_from_coco",
    "id2rgb",
    "masks_to_coco_results",
    "merge_eval_imgs",
    "ray_map",
    "read_panoptic_png",
    "rgb2id",
    "segments_from_panoptic",
    "segments_from_results",
    "segments_to_panoptic",
    "write_panoptic_png",
]
