"""The reconstruction task (mtseg/tasks/reconstruction.py): patch masks, the masked model input and its loss."""

from __future__ import annotations

import pytest
import torch

from mtseg.config import load_config
from mtseg.tasks import build_tasks, model_inputs
from mtseg.tasks.reconstruction import MASK_FILL, ReconstructionTask, random_patch_mask


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


def test_model_inputs_masks_only_when_training_with_reconstruction(categories):
    cfg = load_config(None, ["tasks.names=[semantic,reconstruction]", "tasks.patch_size=4", "tasks.mask_ratio=0.25"])
    tasks = build_tasks(cfg, categories)
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
    no_recon = build_tasks(load_config(None, ["tasks.names=[semantic]"]), categories)
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
