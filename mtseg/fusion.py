"""Fusion: the task heads' outputs -> the final semantic map and COCO instance results.

* :func:`fuse_semantic`: the category argmax, kept inside each pixel's supercategory, with
  low-confidence pixels on predicted boundaries snapped to a more confident neighbour.
* :func:`fuse_instances`: Panoptic-DeepLab grouping (Cheng et al. 2020) of the thing
  pixels (those of thing classes; in an instances-only label space every non-background class).
* :func:`instances_to_coco`: instances -> COCO result dicts for ``COCOeval``.
* :func:`fuse_panoptic`: Panoptic-DeepLab's merge into one panoptic map: each grouped
  instance is a thing segment, each stuff class of the semantic map one stuff segment, and
  segments smaller than a share of the image become void.

This is the one module that names specific tasks; the evaluator scores
:func:`fused_predictions` instead of a head's own argmax.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mtseg.data.categories import IGNORE_INDEX, CategoryIndex
from mtseg.data.coco_panoptic import segment_bbox

# Pixels per chunk when measuring pixel-to-center distances: bounds memory at
# chunk x top_k floats for large images.
_DISTANCE_CHUNK = 65536

# Boundary probability above which a pixel may take a more confident neighbour's label.
_BOUNDARY_THRESHOLD = 0.5


def _check_classes(logits: torch.Tensor, categories: CategoryIndex) -> None:
    if logits.ndim != 4 or logits.shape[1] != categories.num_classes:
        raise ValueError(
            f"fusion: semantic output must be (B, {categories.num_classes}, H, W) for this dataset, got {tuple(logits.shape)}"
        )


def has_instances(task_names) -> bool:
    """Whether a model with these tasks has the head :func:`fuse_instances` groups into instances."""
    return "instance" in task_names


def fused_predictions(semantic_map: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{task: fused prediction}`` for :meth:`mtseg.metrics.Evaluator.process`, from :func:`fuse_semantic`'s map."""
    return {"semantic": semantic_map}


@torch.no_grad()
def fuse_semantic(outputs: dict[str, torch.Tensor], categories: CategoryIndex, hierarchical: bool = True) -> torch.Tensor:
    """Final per-pixel category map.

    On predicted boundary pixels the label of the most confident non-boundary 3x3
    neighbour wins when it is more confident (upsampled logits blur across edges).

    Args:
        outputs: model outputs; ``"semantic"`` (B, K+1, H, W) is required, ``"supercategory"``
            (B, S+1, H, W) and ``"boundary"`` (B, 1, H, W) are used when present.
        categories: the dataset's label spaces (the category -> supercategory map).
        hierarchical: restrict each pixel's category to its argmax supercategory, so the
            two maps always agree.

    Returns:
        (B, H, W) int64 category indices, 0 = background (never in a panoptic label space,
        where 0 is void).
    """
    if "semantic" not in outputs:
        raise KeyError("fuse_semantic: outputs have no 'semantic'")
    logits = outputs["semantic"].float()
    _check_classes(logits, categories)
    if categories.panoptic:  # index 0 is void there: never a target, never a prediction
        logits = logits.clone()
        logits[:, 0] = float("-inf")
    if hierarchical and "supercategory" in outputs:
        sup = outputs["supercategory"].float()
        if sup.shape[1] != categories.num_supercategories:
            raise ValueError(
                f"fusion: supercategory output must have {categories.num_supercategories} channels, got {sup.shape[1]}"
            )
        if categories.panoptic:
            sup = sup.clone()
            sup[:, 0] = float("-inf")
        class_to_super = torch.tensor(categories.class_to_super, device=logits.device)
        allowed = class_to_super.view(1, -1, 1, 1) == sup.argmax(1, keepdim=True)
        logits = logits.masked_fill(~allowed, float("-inf"))
    pred = logits.argmax(1)
    if "boundary" in outputs:
        edge = torch.sigmoid(outputs["boundary"][:, 0].float()) > _BOUNDARY_THRESHOLD
        confidence = torch.softmax(logits, dim=1).amax(1)
        pred = _snap_edges(pred, confidence, edge)
    return pred


def _snap_edges(pred: torch.Tensor, confidence: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """Give edge pixels the label of their most confident non-edge 3x3 neighbour, if more confident."""
    if not edge.any():
        return pred
    b, h, w = pred.shape
    donor = confidence.masked_fill(edge, -1.0)
    donor = F.pad(donor[:, None], (1, 1, 1, 1), value=-1.0)
    conf_n = F.unfold(donor, 3).view(b, 9, h, w)
    labels_n = F.unfold(F.pad(pred[:, None].double(), (1, 1, 1, 1)), 3).view(b, 9, h, w)
    best_conf, best = conf_n.max(1)
    best_label = labels_n.gather(1, best[:, None])[:, 0].long()
    return torch.where(edge & (best_conf > confidence), best_label, pred)


@torch.no_grad()
def find_centers(heatmap: torch.Tensor, *, threshold: float, nms_kernel: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoint NMS on one center heatmap.

    Args:
        heatmap: (H, W) predicted center heatmap.
        threshold: minimum peak value.
        nms_kernel: max-pool window (odd); a peak must be the maximum of its window.
        top_k: keep at most this many peaks, highest first.

    Returns:
        ``(centers (N, 2) float (y, x), scores (N,))``, highest score first.
    """
    if nms_kernel < 1 or nms_kernel % 2 == 0:
        raise ValueError(f"fuse_instances: nms_kernel must be a positive odd number, got {nms_kernel}")
    pooled = F.max_pool2d(heatmap[None, None], nms_kernel, stride=1, padding=nms_kernel // 2)[0, 0]
    peaks = (heatmap == pooled) & (heatmap > threshold)
    ys, xs = peaks.nonzero(as_tuple=True)
    scores = heatmap[ys, xs]
    order = scores.argsort(descending=True, stable=True)[:top_k]
    centers = torch.stack([ys[order], xs[order]], dim=1).to(heatmap.dtype)
    return centers, scores[order]


@torch.no_grad()
def fuse_instances(
    outputs: dict[str, torch.Tensor],
    semantic_map: torch.Tensor,
    categories: CategoryIndex,
    *,
    threshold: float = 0.1,
    nms_kernel: int = 7,
    top_k: int = 200,
) -> list[list[dict]]:
    """Group thing pixels into instances (Panoptic-DeepLab).

    Args:
        outputs: model outputs; ``"instance"`` (B, 3, H, W) = center heatmap, dy, dx is
            required; ``"semantic"`` logits, when present, score each instance.
        semantic_map: (B, H, W) fused category map (:func:`fuse_semantic`), 0 = background.
        categories: the dataset's label spaces.
        threshold, nms_kernel, top_k: the center search, see :func:`find_centers`.

    Returns:
        Per image, a list of ``{"mask": bool ndarray (H, W), "category": contiguous index,
        "score": float}``, highest score first. The score is the center's heatmap value
        times the mean probability of the instance's category over its mask.
    """
    if "instance" not in outputs:
        raise KeyError("fuse_instances: outputs have no 'instance'")
    inst = outputs["instance"].float()
    if inst.ndim != 4 or inst.shape[1] != 3:
        raise ValueError(f"fuse_instances: instance output must be (B, 3, H, W), got {tuple(inst.shape)}")
    if semantic_map.shape != inst.shape[:1] + inst.shape[2:]:
        raise ValueError(f"fuse_instances: semantic_map {tuple(semantic_map.shape)} does not match {tuple(inst.shape)}")
    probs = None
    if "semantic" in outputs:
        _check_classes(outputs["semantic"], categories)
        probs = torch.softmax(outputs["semantic"].float(), dim=1)
    results = []
    thing_class = torch.zeros(max(categories.num_classes, IGNORE_INDEX + 1), dtype=torch.bool, device=semantic_map.device)
    thing_class[: categories.num_classes] = torch.tensor(categories.thing_classes, device=semantic_map.device)
    for b in range(inst.shape[0]):
        centers, center_scores = find_centers(inst[b, 0], threshold=threshold, nms_kernel=nms_kernel, top_k=top_k)
        sem = semantic_map[b]
        owner = _assign_pixels(inst[b, 1:3], thing_class[sem], centers)
        image_probs = None if probs is None else probs[b]
        results.append(_label_instances(owner, sem, center_scores, image_probs, categories.num_classes))
    return results


def _label_instances(
    owner: torch.Tensor, sem: torch.Tensor, center_scores: torch.Tensor, probs: torch.Tensor | None, num_classes: int
) -> list[dict]:
    """Majority category, score and mask of every center that received pixels.

    Everything but the final masks stays on the tensors' device (one host copy per image).
    """
    n = len(center_scores)
    if n == 0:
        return []
    ys, xs = (owner >= 0).nonzero(as_tuple=True)
    ids = owner[ys, xs]
    votes = torch.bincount(ids * num_classes + sem[ys, xs], minlength=n * num_classes).view(n, num_classes)
    votes[:, 0] = 0  # background never labels an instance
    area = torch.bincount(ids, minlength=n)
    category = votes.argmax(1)
    score = center_scores.float()
    if probs is not None:
        class_prob = probs[category[ids], ys, xs]
        score = score * torch.zeros(n, device=score.device).index_add_(0, ids, class_prob) / area.clamp_min(1)
    owner_np = owner.cpu().numpy()
    instances = [
        {"mask": owner_np == k, "category": c, "score": s}
        for k, (c, s, a) in enumerate(zip(category.tolist(), score.tolist(), area.tolist()))
        if a > 0  # a center no pixel voted for (e.g. a duplicate peak) is dropped
    ]
    instances.sort(key=lambda d: d["score"], reverse=True)
    return instances


def _assign_pixels(offset: torch.Tensor, things: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(H, W) index of the center each thing pixel's offset points nearest to; -1 elsewhere."""
    owner = torch.full(things.shape, -1, dtype=torch.int64, device=things.device)
    if len(centers) == 0:
        return owner
    ys, xs = things.nonzero(as_tuple=True)
    if len(ys) == 0:
        return owner
    voted = torch.stack([ys + offset[0, ys, xs], xs + offset[1, ys, xs]], dim=1)  # (N, 2) predicted centers
    # Exact distances (no matmul shortcut), so that equidistant centers tie exactly and
    # argmin sends all of an instance's pixels to the same one.
    nearest = torch.cat(
        [
            torch.cdist(chunk, centers, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
            for chunk in voted.split(_DISTANCE_CHUNK)
        ]
    )
    owner[ys, xs] = nearest
    return owner


def fuse_panoptic(
    semantic_map: torch.Tensor,
    instances: list[dict],
    categories: CategoryIndex,
    *,
    min_area: float = 0.001,
    orig_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """One image's panoptic segmentation (Panoptic-DeepLab's merge).

    Things are :func:`fuse_instances`' groups (every thing pixel belongs to the instance
    whose center its offset points nearest to); stuff is the semantic map's stuff classes,
    one segment per class; a segment smaller than ``min_area`` of the image becomes void, as
    Panoptic-DeepLab's ``stuff_area`` (and, here, for things too, so specks never count as
    false positives).

    Args:
        semantic_map: (H, W) fused category map (:func:`fuse_semantic`) of one image.
        instances: that image's list from :func:`fuse_instances` (masks (H, W)).
        categories: the dataset's label spaces (``isthing`` tells stuff from things).
        min_area: smallest segment, as a share of the image's pixels, in [0, 1].
        orig_size: (height, width) to resize the result to (nearest), else the map's size.

    Returns:
        (id map (H, W) int64, 0 = void; segments ``[{"id", "category_id" (COCO id), "iscrowd": 0,
        "isthing", "area", "bbox" [x, y, w, h]}]``, COCO's ``segments_info``, ids 1..N).
    """
    sem = semantic_map.detach().cpu()
    if sem.ndim != 2:
        raise ValueError(f"fuse_panoptic: semantic_map must be (H, W), got {tuple(sem.shape)}")
    if not 0.0 <= min_area <= 1.0:
        raise ValueError(f"fuse_panoptic: min_area must be in [0, 1], got {min_area}")
    ids = torch.zeros(sem.shape, dtype=torch.int64)
    classes: list[int] = []
    for inst in instances:
        mask = torch.as_tensor(np.asarray(inst["mask"]), dtype=torch.bool) & (ids == 0)
        classes.append(int(inst["category"]))
        ids[mask] = len(classes)
    for c in sem.unique().tolist():
        if 0 < c < categories.num_classes and not categories.thing_classes[c]:
            classes.append(int(c))
            ids[(sem == c) & (ids == 0)] = len(classes)
    if orig_size is not None and tuple(orig_size) != tuple(ids.shape):
        ids = F.interpolate(ids[None, None].double(), size=tuple(orig_size), mode="nearest")[0, 0].long()
    ids_np = ids.numpy()
    area = np.bincount(ids_np.ravel(), minlength=len(classes) + 1)
    smallest = min_area * ids_np.size
    out = np.zeros_like(ids_np)
    segments = []
    for k, c in enumerate(classes, start=1):
        if area[k] == 0 or area[k] < smallest:
            continue  # void
        mask = ids_np == k
        out[mask] = len(segments) + 1
        segments.append(
            {
                "id": len(segments) + 1,
                "category_id": categories.coco_id_of(c),
                "iscrowd": 0,
                "isthing": int(categories.thing_classes[c]),
                "area": int(area[k]),
                "bbox": segment_bbox(mask),
            }
        )
    return out, segments


def instances_to_coco(
    instances: list[dict], image_id: int, categories: CategoryIndex, orig_size: tuple[int, int] | None = None
) -> list[dict]:
    """COCO result dicts for one image's list from :func:`fuse_instances`.

    Args:
        orig_size: (height, width) of the original image; masks are resized to it.

    Returns:
        ``[{"image_id", "category_id" (COCO id), "segmentation" (compressed RLE), "score"}]``.
        No "bbox": ``COCO.loadRes`` would take a box's area for the mask evaluation's area ranges.
    """
    from mtseg.metrics.coco import masks_to_coco_results

    if not instances:
        return []
    masks = [np.asarray(i["mask"]) for i in instances]
    if any(m.ndim != 2 for m in masks):
        raise ValueError(f"instances_to_coco: a mask must be (H, W), got shape {next(m.shape for m in masks if m.ndim != 2)}")
    return masks_to_coco_results(
        image_id,
        np.stack(masks),
        [int(i["category"]) for i in instances],
        [float(i["score"]) for i in instances],
        categories,
        orig_size=orig_size,
    )
