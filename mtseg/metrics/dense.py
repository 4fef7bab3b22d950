"""Pixel metrics accumulated as counts: confusion-matrix mIoU, boundary F1, PSNR.

Each keeps one tensor of sums, never a per-image average, so that workers' results combine
exactly (see :class:`mtseg.metrics.base.SumMetric`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mtseg.data.categories import IGNORE_INDEX
from mtseg.metrics.base import SumMetric


class ConfusionMatrix(SumMetric):
    """Semantic segmentation confusion matrix: mIoU, pixel accuracy, per-class IoU.

    Rows are ground truth, columns predictions (torchvision references' layout). mIoU
    averages over the classes present in the target or the prediction (background
    included); an absent class has IoU NaN and is left out.

    Args:
        num_classes: number of classes including background.
        ignore_index: target value that marks pixels to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    def _empty_state(self) -> torch.Tensor:
        return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch.

        Args:
            pred: (B, H, W) integer predicted class per pixel, values in [0, num_classes).
            target: (B, H, W) integer target class per pixel; ``ignore_index`` is skipped.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred/target: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred/target: expected integer class maps (take argmax of logits first)")
        n = self.num_classes
        target = target.flatten().long()
        pred = pred.flatten().long().to(target.device)
        keep = (target >= 0) & (target < n) & (target != self.ignore_index)
        pred, target = pred[keep], target[keep]
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= n):
            raise ValueError(f"pred: class values must lie in [0, {n}), got [{int(pred.min())}, {int(pred.max())}]")
        counts = torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)
        state = self._state_on(counts.device)
        state += counts

    def compute(self) -> dict[str, Any]:
        """Metrics over everything counted.

        Returns:
            ``{"miou": float, "pixel_acc": float, "iou_per_class": list[float]}``; NaN where
            nothing was counted.
        """
        h = self._state.double().cpu()
        diag = torch.diag(h)
        total = h.sum()
        union = h.sum(0) + h.sum(1) - diag
        iou = torch.where(union > 0, diag / union.clamp(min=1), torch.full_like(diag, math.nan))
        present = union > 0
        miou = float(iou[present].mean()) if bool(present.any()) else math.nan
        pixel_acc = float(diag.sum() / total) if float(total) > 0 else math.nan
        return {"miou": miou, "pixel_acc": pixel_acc, "iou_per_class": [float(v) for v in iou]}


def _disk(radius: int, device: torch.device) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (B, H, W) ``mask`` by a Euclidean disk of ``radius`` pixels."""
    if radius == 0:
        return mask
    hits = F.conv2d(mask[:, None].float(), _disk(radius, mask.device), padding=radius)
    return hits[:, 0] > 0


class BoundaryF1(SumMetric):
    """Boundary F1 with a pixel tolerance (the BF score of Csurka et al., BMVC 2013).

    A boundary pixel matches when one of the other map lies within ``tolerance`` pixels
    (Euclidean). The counts are summed over the dataset and precision/recall/F1 computed
    once from the sums, so images without boundaries cannot produce 0/0; all three are NaN
    when neither map has a boundary pixel anywhere.

    Args:
        tolerance: match distance in pixels (0 = exact position).
    """

    def __init__(self, tolerance: int = 2):
        if int(tolerance) != tolerance or tolerance < 0:
            raise ValueError(f"tolerance: must be a non-negative integer, got {tolerance}")
        self.tolerance = int(tolerance)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance}

    def _empty_state(self) -> torch.Tensor:
        # pred pixels, pred pixels near GT, GT pixels, GT pixels near pred
        return torch.zeros(4, dtype=torch.int64)

    @torch.no_grad()
    def update_from_maps(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch of binary boundary maps.

        Args:
            pred: (B, H, W) predicted boundary (bool, or numbers: nonzero = boundary).
            target: (B, H, W) ground-truth boundary, same convention.
        """
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"pred/target: expected equal (B, H, W) shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
        pred = pred.to(target.device) != 0
        target = target != 0
        near_target = _dilate(target, self.tolerance)
        near_pred = _dilate(pred, self.tolerance)
        counts = torch.stack(
            [
                pred.sum(),
                (pred & near_target).sum(),
                target.sum(),
                (target & near_pred).sum(),
            ]
        ).long()
        state = self._state_on(counts.device)
        state += counts

    def compute(self) -> dict[str, float]:
        """Returns: ``{"boundary_f1", "boundary_precision", "boundary_recall"}`` as floats."""
        n_pred, tp_pred, n_gt, tp_gt = (int(v) for v in self._state.cpu())
        if n_pred == 0 and n_gt == 0:
            return {"boundary_f1": math.nan, "boundary_precision": math.nan, "boundary_recall": math.nan}
        precision = tp_pred / n_pred if n_pred else 0.0
        recall = tp_gt / n_gt if n_gt else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return {"boundary_f1": f1, "boundary_precision": precision, "boundary_recall": recall}


class PSNR(SumMetric):
    """Dataset-level peak signal-to-noise ratio, ``10 log10(max_val^2 / MSE)`` (not a mean of per-image PSNRs).

    A perfect reconstruction gives +inf; nothing counted gives NaN.

    Args:
        max_val: largest possible pixel value (1.0 for images in [0, 1]).
    """

    def __init__(self, max_val: float = 1.0):
        if not max_val > 0:
            raise ValueError(f"max_val: must be > 0, got {max_val}")
        self.max_val = float(max_val)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"max_val": self.max_val}

    def _empty_state(self) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64)  # sum of squared error, element count

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch.

        Args:
            pred: (B, C, H, W) reconstruction.
            target: (B, C, H, W) original.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred/target: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
        err = (pred.to(target.device).double() - target.double()) ** 2
        sse, count = err.sum(), torch.tensor(float(err.numel()), dtype=torch.float64, device=err.device)
        state = self._state_on(err.device)
        state += torch.stack([sse, count])

    def compute(self) -> dict[str, float]:
        """Returns: ``{"psnr": float, "mse": float}``."""
        sse, count = (float(v) for v in self._state.cpu())
        if count == 0:
            return {"psnr": math.nan, "mse": math.nan}
        mse = sse / count
        psnr = math.inf if mse == 0 else 10.0 * math.log10(self.max_val**2 / mse)
        return {"psnr": psnr, "mse": mse}
