"""Validation metrics of a multi-task model, combined (detectron2's ``DatasetEvaluators`` idea).

One :class:`Evaluator` owns each task's metric (the task declares it, see
:class:`mtseg.tasks.base.Task`) and, given the COCO ground truth, the metrics of the fused
instances::

    ev = Evaluator(categories, tasks, coco_gt=gt)     # tasks: {name: Task}
    for batch in val_batches:
        outputs = model(batch["image"])
        ev.process(batch, outputs, fused, coco_results)  # fused: {task: fused prediction}
    ev.all_reduce()                                   # under DDP: every rank gets the totals
    metrics = ev.compute()                            # {"val/miou": ..., "val/mask_ap": ..., ...}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pycocotools.coco import COCO

from mtseg.data.categories import CategoryIndex
from mtseg.metrics.coco import CocoMaskEvaluator, MapFn
from mtseg.metrics.dense import ConfusionMatrix
from mtseg.metrics.panoptic import PanopticQuality, gt_segments_from_coco, segments_from_results

if TYPE_CHECKING:
    from mtseg.tasks.base import Task

#: Keys of the fused instances' accumulators (never a task's name: those hold task metrics).
_MASK, _PANOPTIC = "mask", "panoptic"


class Evaluator:
    """Validation metrics for the tasks given, as one slash-namespaced dict.

    Every task with a metric (:meth:`Task.metric`) contributes the keys of its
    :meth:`Task.compute_metric`; with ``coco_gt``, the fused instances add COCO mask AP
    (``mask_ap``, ``mask_ap50``, ...) and panoptic quality (``pq``, ``sq``, ``rq``).

    Args:
        categories: the dataset's label spaces.
        tasks: the model's tasks, ``{name: Task}`` (:func:`mtseg.tasks.build_tasks`).
        coco_gt: ground truth at original resolution for mask AP and PQ; pass it when the
            model fuses instances (:func:`mtseg.fusion.has_instances`).
        prefix: namespace of the returned keys.
    """

    def __init__(self, categories: CategoryIndex, tasks: Mapping[str, Task], coco_gt: COCO | None = None, prefix: str = "val"):
        self.categories = categories
        self.tasks = dict(tasks)
        self.coco_gt = coco_gt
        self.prefix = prefix
        self.metrics: dict[str, Any] = {}
        for name, task in self.tasks.items():
            metric = task.metric()
            if metric is not None:
                self.metrics[name] = metric
        if coco_gt is not None:
            # Mask AP is a things metric: in a panoptic space the stuff segments leave its ground truth.
            self.metrics[_MASK] = CocoMaskEvaluator(_things_only(coco_gt, categories) if categories.panoptic else coco_gt)
            self.metrics[_PANOPTIC] = PanopticQuality(categories.num_classes, isthing=categories.thing_classes)

    def reset(self) -> None:
        """Forget everything processed so far."""
        for m in self.metrics.values():
            m.reset()

    @torch.no_grad()
    def process(
        self,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        fused: Mapping[str, torch.Tensor] | None = None,
        instances: Sequence[dict] | None = None,
        panoptic: Sequence[tuple[np.ndarray, list[dict]]] | None = None,
    ) -> None:
        """Add one batch.

        Args:
            batch: training-batch dict: ``image``, ``image_id`` and the tasks' targets.
            outputs: model outputs (logits at input resolution), ``{task: tensor}``.
            fused: fused predictions that replace a task's own decision from its output,
                ``{task: tensor}`` (:func:`mtseg.fusion.fused_predictions`).
            instances: COCO result dicts of this batch's images (masks at the original image
                size, e.g. from :func:`mtseg.fusion.instances_to_coco`), for mask AP and (without
                ``panoptic``) PQ.
            panoptic: per image of the batch, its panoptic segmentation at the original size
                (:func:`mtseg.fusion.fuse_panoptic`: id map and COCO ``segments_info``); PQ over
                things and stuff is scored on these against the ground truth's segments.
        """
        fused = fused or {}
        for name, task in self.tasks.items():
            if name not in self.metrics:
                continue
            if name not in outputs and name not in fused:
                raise ValueError(f"outputs: missing '{name}' (needed by the {name} metric)")
            for key in task.target_keys:
                if key not in batch:
                    raise ValueError(f"batch: missing '{key}' (needed by the {name} metric)")
            task.update_metric(self.metrics[name], outputs.get(name), batch, fused.get(name))
        if _MASK in self.metrics and instances is not None:
            if "image_id" not in batch:
                raise ValueError("batch: missing 'image_id' (needed by the mask AP metric)")
            self.metrics[_MASK].update(instances)
            if panoptic is not None:
                self._update_panoptic_maps(panoptic, batch["image_id"])
            else:
                self._update_panoptic(instances, batch["image_id"])

    def _update_panoptic(self, results: Sequence[dict], image_ids: torch.Tensor) -> None:
        by_image: dict[int, list[dict]] = defaultdict(list)
        for r in results:
            by_image[int(r["image_id"])].append(r)
        class_of = self.categories.class_of
        for image_id in (int(i) for i in image_ids.reshape(-1).tolist()):
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"batch: image_id {image_id} is not in the COCO ground truth")
            info = self.coco_gt.imgs[image_id]
            pred = segments_from_results(by_image.get(image_id, []), int(info["height"]), int(info["width"]), class_of=class_of)
            gt, void = gt_segments_from_coco(self.coco_gt, image_id, class_of=class_of)
            self.metrics[_PANOPTIC].update(pred, gt, void)

    def _update_panoptic_maps(self, panoptic: Sequence[tuple[np.ndarray, list[dict]]], image_ids: torch.Tensor) -> None:
        ids = [int(i) for i in image_ids.reshape(-1).tolist()]
        if len(panoptic) != len(ids):
            raise ValueError(f"panoptic: {len(panoptic)} segmentations for a batch of {len(ids)} images")
        for image_id, (pred_map, pred_segments) in zip(ids, panoptic):
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"batch: image_id {image_id} is not in the COCO ground truth")
            gt_map, gt_segments = panoptic_gt(self.coco_gt, image_id)
            self.metrics[_PANOPTIC].update_from_coco(pred_map, pred_segments, gt_map, gt_segments, self.categories)

    def all_reduce(self, num_shards: int = 1, executor: MapFn | None = None) -> None:
        """Combine all torch.distributed ranks (call on every rank; no-op without a process group).

        Args:
            num_shards: COCO matching shards per rank (see :meth:`CocoMaskEvaluator.all_reduce`).
            executor: ``map``-like callable for those shards.
        """
        for name, metric in self.metrics.items():
            if name == _MASK:
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
            if name == _MASK:
                self.metrics[name] = CocoMaskEvaluator.from_state(state[name], self.coco_gt)
            else:
                self.metrics[name] = type(metric).from_state(state[name])

    def compute(self, num_shards: int = 1, executor: MapFn | None = None) -> dict[str, float]:
        """All metrics as ``{"<prefix>/<name>": float}``, NaN where undefined.

        Args:
            num_shards: COCO matching shards (see :meth:`CocoMaskEvaluator.compute`).
            executor: ``map``-like callable running them; default serial.
        """
        values: dict[str, float] = {}
        for name, task in self.tasks.items():
            if name in self.metrics:
                values.update(task.compute_metric(self.metrics[name]))
        if _MASK in self.metrics:
            values.update(self.metrics[_MASK].compute(num_shards, executor))
            r = self.metrics[_PANOPTIC].compute()
            keys = ["pq", "sq", "rq"]
            if self.categories.panoptic:
                keys += [f"{m}_{part}" for part in ("things", "stuff") for m in ("pq", "sq", "rq")]
            values.update({k: r[k] for k in keys})
        return {f"{self.prefix}/{k}": v for k, v in values.items()}

    def per_class(self) -> dict[str, dict[str, float]]:
        """Per-class values by class name, for reports: ``{"iou": {...}, "pq": {...}, "sq": ..., "rq": ...}``.

        ``iou`` comes from a task's confusion matrix over the categories (the semantic task's),
        the others from panoptic quality (with the ground truth); NaN where a class was never
        seen. Call after :meth:`all_reduce` under DDP, like :meth:`compute`.
        """
        names = ("background", *self.categories.names)
        out: dict[str, dict[str, float]] = {}
        for metric in self.metrics.values():
            if isinstance(metric, ConfusionMatrix) and metric.num_classes == self.categories.num_classes:
                ious = metric.compute()["iou_per_class"]
                out["iou"] = {names[c]: float(v) for c, v in enumerate(ious) if c > 0 or not self.categories.panoptic}
                break
        if _PANOPTIC in self.metrics:
            r = self.metrics[_PANOPTIC].compute()
            for key in ("pq", "sq", "rq"):
                values = r.get(f"{key}_per_class")
                if values is not None:
                    out[key] = {names[c]: float(v) for c, v in enumerate(values) if c > 0}
        return out


def _things_only(coco_gt: COCO, categories: CategoryIndex) -> COCO:
    """The ground truth without its stuff categories and segments (mask AP scores things)."""
    from mtseg.metrics.coco import _coco_from_dataset

    things = {categories.coco_id_of(c) for c in range(1, categories.num_classes) if categories.thing_classes[c]}
    dataset = coco_gt.dataset
    return _coco_from_dataset(
        {
            "images": dataset["images"],
            "annotations": [a for a in dataset["annotations"] if a["category_id"] in things],
            "categories": [c for c in dataset["categories"] if c["id"] in things],
        }
    )


def panoptic_gt(coco_gt: COCO, image_id: int) -> tuple[np.ndarray, list[dict]]:
    """One image's ground truth as COCO's panoptic format: (segment-id map, ``segments_info``).

    The ground truth holds a panoptic split's segments as annotations (``mtseg data shard
    --annotations panoptic``); they are disjoint, and pixels none owns are void (0).
    """
    info = coco_gt.imgs[int(image_id)]
    ids = np.zeros((int(info["height"]), int(info["width"])), np.int64)
    segments = []
    for k, ann in enumerate(coco_gt.imgToAnns.get(int(image_id), []), start=1):
        ids[coco_gt.annToMask(ann).astype(bool)] = k  # PNG ids are per image; annotation ids are split-wide
        segments.append(
            {
                "id": k,
                "category_id": int(ann["category_id"]),
                "iscrowd": int(ann.get("iscrowd", 0)),
                "bbox": list(ann["bbox"]),
                "area": float(ann["area"]),
            }
        )
    return ids, segments
