"""Validation metrics of a multi-task model, combined (detectron2's ``DatasetEvaluators`` idea).

One :class:`Evaluator` owns one accumulator per metric of the configured tasks::

    ev = Evaluator(categories, cfg.tasks.names, coco_gt=gt)
    for batch in val_batches:
        outputs = model(batch["image"])
        fused = fuse(outputs)                     # fused semantic map + COCO instance results
        ev.process(batch, outputs, fused.semantic, fused.coco_results)
    ev.all_reduce()                               # under DDP: every rank gets the totals
    metrics = ev.compute()                        # {"val/miou": ..., "val/mask_ap": ..., ...}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pycocotools.coco import COCO

from mtseg.data.categories import CategoryIndex
from mtseg.metrics.base import SumMetric
from mtseg.metrics.coco import CocoMaskEvaluator, MapFn
from mtseg.metrics.dense import PSNR, BoundaryF1, ConfusionMatrix
from mtseg.metrics.panoptic import PanopticQuality, gt_segments_from_coco, segments_from_results


def _flatten_results(instances: Iterable[Any]) -> list[dict]:
    """A flat list of COCO result dicts from a flat list or a per-image list of lists."""
    flat: list[dict] = []
    for item in instances:
        if isinstance(item, Mapping):
            flat.append(dict(item))
        else:
            flat.extend(dict(r) for r in item)
    return flat


class Evaluator:
    """Validation metrics for the tasks present, as one slash-namespaced dict.

    ============== ================================================ ===============================
    task           metric                                           keys
    ============== ================================================ ===============================
    semantic       confusion matrix of the fused semantic map       miou, pixel_acc
    supercategory  confusion matrix of argmax supercategory logits  supercategory_miou
    boundary       BoundaryF1 of ``sigmoid(logit) > 0.5``           boundary_f1, _precision, _recall
    reconstruction PSNR of the output clamped to [0, 1] vs image    psnr
    instance       COCO mask AP (needs ``coco_gt`` and instances)   mask_ap, mask_ap50, mask_ap75,
                                                                    mask_ap_s, mask_ap_m, mask_ap_l
    instance       panoptic quality over things (same condition)    pq, sq, rq
    ============== ================================================ ===============================

    Args:
        categories: the dataset's label spaces.
        task_names: the model's tasks (``cfg.tasks.names``).
        coco_gt: ground truth at original resolution for mask AP and PQ; without it the
            instance metrics are off.
        boundary_tolerance: BoundaryF1 tolerance in pixels.
        pq_score_threshold: lowest instance score pasted into the panoptic prediction.
        prefix: namespace of the returned keys.
    """

    def __init__(self, categories: CategoryIndex, task_names: Iterable[str], coco_gt: COCO | None = None,
                 boundary_tolerance: int = 2, pq_score_threshold: float = 0.5, prefix: str = "val"):
        self.categories = categories
        self.task_names = tuple(task_names)
        self.coco_gt = coco_gt
        self.prefix = prefix
        self.pq_score_threshold = float(pq_score_threshold)
        self.metrics: dict[str, Any] = {}
        tasks = set(self.task_names)
        if "semantic" in tasks:
            self.metrics["semantic"] = ConfusionMatrix(categories.num_classes)
        if "supercategory" in tasks:
            self.metrics["supercategory"] = ConfusionMatrix(categories.num_supercategories)
        if "boundary" in tasks:
            self.metrics["boundary"] = BoundaryF1(boundary_tolerance)
        if "reconstruction" in tasks:
            self.metrics["reconstruction"] = PSNR(max_val=1.0)
        if "instance" in tasks and coco_gt is not None:
            self.metrics["mask"] = CocoMaskEvaluator(coco_gt)
            self.metrics["panoptic"] = PanopticQuality(categories.num_classes)

    def reset(self) -> None:
        """Forget everything processed so far."""
        for m in self.metrics.values():
            m.reset()

    @staticmethod
    def _get(source: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
        if key not in source:
            raise ValueError(f"{what}: missing '{key}' (needed by the {key} metric)")
        return source[key]

    @torch.no_grad()
    def process(self, batch: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor],
                semantic_pred: torch.Tensor | None = None, instances: Iterable[Any] | None = None) -> None:
        """Add one batch.

        Args:
            batch: training-batch dict (the data contract): ``image``, ``semantic``,
                ``supercategory``, ``boundary``, ``image_id`` as the tasks need.
            outputs: model outputs (logits at input resolution).
            semantic_pred: (B, H, W) fused semantic class map; argmax of
                ``outputs["semantic"]`` when None.
            instances: COCO result dicts of this batch's images (COCO category ids, masks at
                the original image size, e.g. from :func:`mtseg.metrics.masks_to_coco_results`),
                as a flat list or one list per image. Needed for mask AP and PQ.
        """
        m = self.metrics
        if "semantic" in m:
            if semantic_pred is None:
                semantic_pred = self._get(outputs, "semantic", "outputs").argmax(1)
            m["semantic"].update(semantic_pred, self._get(batch, "semantic", "batch"))
        if "supercategory" in m:
            pred = self._get(outputs, "supercategory", "outputs").argmax(1)
            m["supercategory"].update(pred, self._get(batch, "supercategory", "batch"))
        if "boundary" in m:
            # sigmoid(x) > 0.5 <=> x > 0, without computing the sigmoid.
            pred = self._get(outputs, "boundary", "outputs")[:, 0] > 0
            m["boundary"].update_from_maps(pred, self._get(batch, "boundary", "batch") > 0.5)
        if "reconstruction" in m:
            recon = self._get(outputs, "reconstruction", "outputs").float().clamp(0.0, 1.0)
            m["reconstruction"].update(recon, self._get(batch, "image", "batch").float())
        if "mask" in m and instances is not None:
            results = _flatten_results(instances)
            m["mask"].update(results)
            self._update_panoptic(results, self._get(batch, "image_id", "batch"))

    def _update_panoptic(self, results: list[dict], image_ids: torch.Tensor) -> None:
        by_image: dict[int, list[dict]] = defaultdict(list)
        for r in results:
            by_image[int(r["image_id"])].append(r)
        class_of = self.categories.class_of
        for image_id in (int(i) for i in image_ids.reshape(-1).tolist()):
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"batch: image_id {image_id} is not in the COCO ground truth")
            info = self.coco_gt.imgs[image_id]
            pred = segments_from_results(by_image.get(image_id, []), int(info["height"]), int(info["width"]),
                                         class_of=class_of, score_threshold=self.pq_score_threshold)
            gt, void = gt_segments_from_coco(self.coco_gt, image_id, class_of=class_of)
            self.metrics["panoptic"].update(pred, gt, void)

    def all_reduce(self, num_shards: int = 1, executor: MapFn | None = None) -> None:
        """Combine all torch.distributed ranks (call on every rank; no-op without a process group).

        Args:
            num_shards: COCO matching shards per rank (see :meth:`CocoMaskEvaluator.all_reduce`).
            executor: ``map``-like callable for those shards.
        """
        for name, metric in self.metrics.items():
            if name == "mask":
                metric.all_reduce(num_shards=num_shards, executor=executor)
            else:
                metric.all_reduce()

    def merge(self, other: Evaluator) -> None:
        """Add another evaluator's accumulations (same tasks) to this one."""
        if set(other.metrics) != set(self.metrics):
            raise ValueError(f"merge: metrics differ, {sorted(other.metrics)} vs {sorted(self.metrics)}")
        for name, metric in self.metrics.items():
            metric.merge(other.metrics[name])

    def state_dict(self) -> dict[str, Any]:
        """Every metric's state (picklable, CPU), to ship between Ray actors."""
        return {name: metric.state_dict() for name, metric in self.metrics.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the accumulations with :meth:`state_dict` output of a like-built evaluator."""
        if set(state) != set(self.metrics):
            raise ValueError(f"load_state_dict: metrics differ, {sorted(state)} vs {sorted(self.metrics)}")
        for name, metric in list(self.metrics.items()):
            if isinstance(metric, SumMetric):
                self.metrics[name] = type(metric).from_state(state[name])
            else:
                self.metrics[name] = CocoMaskEvaluator.from_state(state[name], self.coco_gt)

    def compute(self, num_shards: int = 1, executor: MapFn | None = None) -> dict[str, float]:
        """All metrics as ``{"<prefix>/<name>": float}``.

        Args:
            num_shards: COCO matching shards (see :meth:`CocoMaskEvaluator.compute`).
            executor: ``map``-like callable running them; default serial.

        Returns:
            Keys for the tasks present only (see the class docstring); NaN where undefined.
        """
        p = self.prefix
        out: dict[str, float] = {}
        m = self.metrics
        if "semantic" in m:
            r = m["semantic"].compute()
            out[f"{p}/miou"], out[f"{p}/pixel_acc"] = r["miou"], r["pixel_acc"]
        if "supercategory" in m:
            out[f"{p}/supercategory_miou"] = m["supercategory"].compute()["miou"]
        if "boundary" in m:
            out.update({f"{p}/{k}": v for k, v in m["boundary"].compute().items()})
        if "reconstruction" in m:
            out[f"{p}/psnr"] = m["reconstruction"].compute()["psnr"]
        if "mask" in m:
            out.update({f"{p}/{k}": v for k, v in m["mask"].compute(num_shards, executor).items()})
            r = m["panoptic"].compute()
            out.update({f"{p}/pq": r["pq"], f"{p}/sq": r["sq"], f"{p}/rq": r["rq"]})
        return out
