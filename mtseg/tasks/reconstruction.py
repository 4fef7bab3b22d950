"""Self-supervised masked-patch reconstruction (after MAE, He et al. 2022, for a CNN).

During training a random ``mask_ratio`` share of ``patch_size`` patches of the input is
filled with the normalisation mean (zero after the model normalises, so a masked patch
carries no signal) and the head reconstructs the original image. The loss is L1 on the
masked pixels only (all pixels when nothing was masked). It needs no annotation, so it
also learns from unlabeled images (``batch["labeled"] == False``).

Every task sees the masked input, so masking also acts as a cutout-style augmentation
for the supervised heads; evaluation (``train=False``) never masks.

Target: ``batch["image"]`` (B, 3, H, W) in [0, 1]; ``batch["recon_mask"]`` (B, 1, H, W)
written by :meth:`ReconstructionTask.transform_inputs`. Head: 3 channels through a
sigmoid (image space [0, 1]). Metric: PSNR (:class:`mtseg.metrics.PSNR`) of the output against
the image; validation never masks, so over every pixel. Picture: the reconstructed image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mtseg.metrics.dense import PSNR
from mtseg.render import to_uint8_image
from mtseg.tasks.base import Task, conv_head, head_hidden, resize_map

# The model's input normalisation mean (ImageNet); masked pixels are set to it.
MASK_FILL = (0.485, 0.456, 0.406)


def random_patch_mask(
    batch_size: int,
    height: int,
    width: int,
    *,
    patch_size: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A (B, 1, H, W) float mask, 1 on ``round(mask_ratio * n)`` random patches per image.

    Patches tile the image from the top-left; a partial last row/column counts as a patch.

    Args:
        batch_size, height, width: the images' shape.
        patch_size: patch side in pixels.
        mask_ratio: share of patches masked, in [0, 1].
        generator: random source (its device is used for the draw), for reproducibility.
        device: where the mask is returned.

    Returns:
        The mask.
    """
    if patch_size < 1:
        raise ValueError(f"tasks.patch_size: {patch_size} must be >= 1")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"tasks.mask_ratio: {mask_ratio} must be within [0, 1]")
    gh, gw = math.ceil(height / patch_size), math.ceil(width / patch_size)
    n = gh * gw
    k = int(round(mask_ratio * n))
    draw_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, n, generator=generator, device=draw_device)
    # The k lowest-noise patches of each image: exactly k per image, unlike a Bernoulli draw.
    ranks = noise.argsort(dim=1).argsort(dim=1)
    grid = (ranks < k).to(torch.float32).view(batch_size, 1, gh, gw)
    mask = grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return mask[:, :, :height, :width].to(device if device is not None else draw_device)


@dataclass(frozen=True)
class ReconstructionTask(Task):
    """Masked-patch image reconstruction.

    Attributes:
        patch_size: masked patch side, pixels.
        mask_ratio: share of patches masked during training.
    """

    patch_size: int = 8
    mask_ratio: float = 0.5
    name: ClassVar[str] = "reconstruction"
    head_width: ClassVar[float] = 0.5
    target_keys: ClassVar[tuple[str, ...]] = ("image",)
    objective: ClassVar[str] = "psnr"

    @classmethod
    def from_config(cls, cfg, categories) -> ReconstructionTask:
        return cls(patch_size=cfg.tasks.patch_size, mask_ratio=cfg.tasks.mask_ratio)

    @property
    def out_channels(self) -> int:
        return 3

    def build_head(self, in_channels: int) -> nn.Module:
        return nn.Sequential(conv_head(in_channels, 3, head_hidden(in_channels, self.head_width)), nn.Sigmoid())

    def transform_inputs(
        self, images: torch.Tensor, batch: dict[str, torch.Tensor], *, train: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        if not train or self.mask_ratio == 0.0:
            return images
        b, _, h, w = images.shape
        mask = random_patch_mask(
            b, h, w, patch_size=self.patch_size, mask_ratio=self.mask_ratio, generator=generator, device=images.device
        )
        batch["recon_mask"] = mask
        fill = torch.tensor(MASK_FILL, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return torch.lerp(images, fill.expand_as(images), mask.to(images.dtype))

    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_batch(output, batch)
        diff = (output.float() - batch["image"].float()).abs()
        mask = batch.get("recon_mask")
        if mask is None:
            return diff.mean()
        mask = mask.float()
        return (diff * mask).sum() / (mask.sum() * diff.shape[1]).clamp_min(1.0)

    def metric(self) -> PSNR:
        return PSNR(max_val=1.0)

    def update_metric(self, metric, output, batch, prediction=None) -> None:
        metric.update(output.float().clamp(0.0, 1.0), batch["image"].float())

    def compute_metric(self, metric) -> dict[str, float]:
        return {"psnr": metric.compute()["psnr"]}

    def output_map(self, output, size):
        rec = resize_map(output.clamp(0, 1), size, "bilinear").clamp(0, 1)
        return (rec.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()

    def target_map(self, batch, index):
        return to_uint8_image(batch["image"][index].cpu().numpy())

    def draw(self, image, values, categories):
        return values
