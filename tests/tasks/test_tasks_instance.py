"""The instance task (mtseg/tasks/instance.py): its center and offset loss."""

from __future__ import annotations

import pytest
import torch

from mtseg.tasks.instance import InstanceTask


def test_instance_loss_is_zero_for_perfect_output_and_weights_offsets_by_thing_mask():
    task = InstanceTask()
    center = torch.rand(2, 1, 8, 8)
    offset = torch.randn(2, 2, 8, 8)
    things = (torch.rand(2, 8, 8) > 0.5).float()
    batch = {"center": center, "offset": offset * things[:, None], "thing_mask": things}
    perfect = torch.cat([center, offset * things[:, None]], 1)
    assert task.loss(perfect, batch).item() == pytest.approx(0.0, abs=1e-7)
    wrong_outside_things = perfect.clone()
    wrong_outside_things[:, 1:][(things == 0)[:, None].expand(-1, 2, -1, -1)] += 5.0
    assert task.loss(wrong_outside_things, batch).item() == pytest.approx(0.0, abs=1e-7)
    off_by_one = perfect.clone()
    off_by_one[:, 1] += 1.0  # dy off by one pixel on every pixel
    assert task.loss(off_by_one, batch).item() == pytest.approx(task.offset_weight * 1.0)
