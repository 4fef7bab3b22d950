"""The boundary task (mtseg/tasks/boundary.py): its class-balanced BCE loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtseg.tasks.boundary import MAX_POS_WEIGHT, BoundaryTask


def test_boundary_bce_is_balanced():
    task = BoundaryTask()
    target = torch.zeros(1, 10, 10)
    target[0, 5] = 1.0  # 10 edge pixels, 90 others: pos_weight 9
    logit = torch.randn(1, 1, 10, 10)
    expected = F.binary_cross_entropy_with_logits(logit[:, 0], target, pos_weight=torch.tensor(9.0))
    assert torch.allclose(task.loss(logit, {"boundary": target}), expected)
    sparse = torch.zeros(1, 10, 10)
    sparse[0, 0, 0] = 1.0
    expected = F.binary_cross_entropy_with_logits(logit[:, 0], sparse, pos_weight=torch.tensor(MAX_POS_WEIGHT))
    assert torch.allclose(task.loss(logit, {"boundary": sparse}), expected)
