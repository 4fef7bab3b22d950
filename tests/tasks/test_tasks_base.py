"""The task interface (mtseg/tasks/base.py), on every registered task: pictures and the Δm% objective."""

from __future__ import annotations

import numpy as np
import torch

from mtseg.config import load_config
from mtseg.tasks import TASKS, build_tasks


def test_each_task_draws_its_output_and_target_at_the_image_size(categories):
    tasks = build_tasks(load_config(None, []), categories)
    sem = torch.randint(0, categories.num_classes, (2, 16, 16))
    batch = {
        "image": torch.rand(2, 3, 16, 16),
        "semantic": sem,
        "supercategory": torch.tensor(categories.class_to_super)[sem],
        "boundary": (torch.rand(2, 16, 16) > 0.8).float(),
        "center": torch.rand(2, 1, 16, 16),
    }
    outputs = {name: torch.randn(task.out_channels, 16, 16) for name, task in tasks.items()}
    image = np.zeros((24, 40, 3), np.uint8)  # the original image: maps come back at its size
    for name, task in tasks.items():
        for values in (task.output_map(outputs[name], (24, 40)), task.target_map(batch, 1)):
            assert values.shape[:2] in ((24, 40), (16, 16)), name
            picture = np.asarray(task.draw(image if values.shape[0] == 24 else image[:16, :16], values, categories))
            assert picture.dtype == np.uint8 and picture.shape[2] == 3 and picture.shape[0] >= values.shape[0], name
    # probabilities are drawn on a fixed scale: a map of zeros is black, not stretched
    assert not np.asarray(tasks["boundary"].draw(image, np.zeros((24, 40), np.float32), categories)).any()


def test_tasks_declare_their_delta_m_objective():
    for name, cls in TASKS.items():
        assert cls.objective, name
        assert all(r in TASKS and r != name for r in cls.requires), name
