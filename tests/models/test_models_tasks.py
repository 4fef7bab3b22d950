"""Tasks (mtseg/tasks): losses, input masking, metrics and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtseg.config import TASK_NAMES, load_config
from mtseg.data.categories import IGNORE_INDEX, CategoryIndex
from mtseg.tasks import TASKS, build_tasks, compute_losses, model_inputs
from mtseg.tasks.boundary import MAX_POS_WEIGHT, BoundaryTask
from mtseg.tasks.instance import InstanceTask
from mtseg.tasks.reconstruction import MASK_FILL, ReconstructionTask, random_patch_mask
from mtseg.tasks.semantic import SemanticTask

CATEGORIES = CategoryIndex.from_categories([{"id": cid, "name": f"c{cid}", "supercategory": f"s{cid % 2}"} for cid in (1, 4, 6)])


def test_registry_and_build_order():
    assert tuple(TASKS)[: len(TASK_NAMES)] == TASK_NAMES  # the built-in ones first (tests may register more)
    cfg = load_config(None, ["tasks.names=[semantic,reconstruction,boundary]"])
    tasks = build_tasks(cfg, CATEGORIES)
    assert list(tasks) == ["semantic", "reconstruction", "boundary"]
    assert tasks["semantic"].out_channels == CATEGORIES.num_classes
    cfg.tasks.names = ["semantic", "depth"]
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        build_tasks(cfg, CATEGORIES)


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


def test_random_patch_mask_counts_and_reproducibility():
    mask = random_patch_mask(3, 20, 20, patch_size=8, mask_ratio=0.5, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (3, 1, 20, 20)
    grid = mask[:, 0, ::8, ::8]  # one sample per patch of the 3x3 grid (partial last row/column)
    assert grid.sum(dim=(1, 2)).tolist() == [4.0, 4.0, 4.0]  # round(0.5 * 9)
    # every patch is all-masked or all-unmasked
    up = grid.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :20, :20]
    assert torch.equal(up, mask[:, 0])
    again = random_patch_mask(3, 20, 20, patch_size=8, mask_ratio=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(1, 8, 8, patch_size=4, mask_ratio=1.5)


def test_model_inputs_masks_only_when_training_with_reconstruction():
    cfg = load_config(None, ["tasks.names=[semantic,reconstruction]", "tasks.patch_size=4", "tasks.mask_ratio=0.25"])
    tasks = build_tasks(cfg, CATEGORIES)
    image = torch.rand(2, 3, 16, 16)
    batch = {"image": image.clone()}
    x = model_inputs(batch, tasks, cfg, train=True, generator=torch.Generator().manual_seed(0))
    mask = batch["recon_mask"]
    assert mask.shape == (2, 1, 16, 16) and mask.sum().item() == 2 * 4 * 16  # 4 of 16 patches of 16 px
    assert torch.equal(batch["image"], image)  # the target stays intact
    fill = torch.tensor(MASK_FILL).view(1, 3, 1, 1).expand_as(x)
    assert torch.allclose(x[mask.expand_as(x) > 0], fill[mask.expand_as(x) > 0])
    assert torch.equal(x[mask.expand_as(x) == 0], image[mask.expand_as(x) == 0])

    eval_batch = {"image": image}
    assert model_inputs(eval_batch, tasks, cfg, train=False) is image and "recon_mask" not in eval_batch
    no_recon = build_tasks(load_config(None, ["tasks.names=[semantic]"]), CATEGORIES)
    train_batch = {"image": image}
    assert model_inputs(train_batch, no_recon, cfg, train=True) is image and "recon_mask" not in train_batch


def test_reconstruction_loss_on_masked_pixels_and_unlabeled_images():
    task = ReconstructionTask(patch_size=4, mask_ratio=0.5)
    image = torch.zeros(2, 3, 8, 8)
    output = torch.zeros(2, 3, 8, 8)
    output[:, :, :4] = 1.0  # wrong on the top half only
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 4:] = 1.0  # masked: bottom half
    assert task.loss(output, {"image": image, "recon_mask": mask}).item() == 0.0
    mask[:, :, :2] = 1.0
    assert task.loss(output, {"image": image, "recon_mask": mask}).item() == pytest.approx(2 / 6)
    assert task.loss(output, {"image": image}).item() == pytest.approx(0.5)  # no mask: every pixel
    labeled = torch.tensor([False, False])
    assert task.loss(output, {"image": image, "labeled": labeled}).item() == pytest.approx(0.5)  # needs no labels


def test_compute_losses_errors_name_what_is_missing():
    cfg = load_config(None, ["tasks.names=[semantic,boundary]"])
    tasks = build_tasks(cfg, CATEGORIES)
    out = {"semantic": torch.randn(1, 4, 8, 8), "boundary": torch.randn(1, 1, 8, 8)}
    with pytest.raises(KeyError, match="task boundary: the batch has no 'boundary'"):
        compute_losses(tasks, out, {"semantic": torch.zeros(1, 8, 8, dtype=torch.long)})
    with pytest.raises(KeyError, match="no 'boundary' output"):
        compute_losses(tasks, {"semantic": out["semantic"]}, {})
    with pytest.raises(ValueError, match="spatial sizes differ"):
        compute_losses(tasks, out, {"semantic": torch.zeros(1, 4, 4, dtype=torch.long), "boundary": torch.zeros(1, 8, 8)})


def test_each_task_draws_its_output_and_target_at_the_image_size():
    tasks = build_tasks(load_config(None, []), CATEGORIES)
    sem = torch.randint(0, CATEGORIES.num_classes, (2, 16, 16))
    batch = {
        "image": torch.rand(2, 3, 16, 16),
        "semantic": sem,
        "supercategory": torch.tensor(CATEGORIES.class_to_super)[sem],
        "boundary": (torch.rand(2, 16, 16) > 0.8).float(),
        "center": torch.rand(2, 1, 16, 16),
    }
    outputs = {name: torch.randn(task.out_channels, 16, 16) for name, task in tasks.items()}
    image = np.zeros((24, 40, 3), np.uint8)  # the original image: maps come back at its size
    for name, task in tasks.items():
        for values in (task.output_map(outputs[name], (24, 40)), task.target_map(batch, 1)):
            assert values.shape[:2] in ((24, 40), (16, 16)), name
            picture = np.asarray(task.draw(image if values.shape[0] == 24 else image[:16, :16], values, CATEGORIES))
            assert picture.dtype == np.uint8 and picture.shape[2] == 3 and picture.shape[0] >= values.shape[0], name
    # probabilities are drawn on a fixed scale: a map of zeros is black, not stretched
    assert not np.asarray(tasks["boundary"].draw(image, np.zeros((24, 40), np.float32), CATEGORIES)).any()


def test_tasks_declare_their_delta_m_objective():
    for name, cls in TASKS.items():
        assert cls.objective, name
        assert all(r in TASKS and r != name for r in cls.requires), name
