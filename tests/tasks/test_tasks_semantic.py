"""The semantic task (mtseg/tasks/semantic.py): its cross-entropy loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtseg.data.categories import IGNORE_INDEX
from mtseg.tasks.semantic import SemanticTask


def test_cross_entropy_ignores_crowd_and_unlabeled_images():
    task = SemanticTask(num_classes=4)
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0] = IGNORE_INDEX
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert torch.allclose(task.loss(logits, {"semantic": target}), expected)

    only_second = task.loss(logits, {"semantic": target, "labeled": torch.tensor([False, True])})
    assert torch.allclose(only_second, F.cross_entropy(logits[1:], target[1:]))
    only_second.backward()
    assert logits.grad[0].abs().sum() == 0  # the unlabeled image gets no gradient

    all_crowd = torch.full((2, 5, 5), IGNORE_INDEX)
    assert task.loss(logits, {"semantic": all_crowd}).item() == 0.0  # not NaN
