"""The multi-task model: one shared encoder-decoder, one head per task (hard parameter sharing).

``model(images)`` takes (B, 3, H, W) images in [0, 1], normalises them internally (with the
backbone's own statistics when its weights name them, else ImageNet's), runs
backbone -> decoder (stride 4) -> every task head, lets the tasks refine the raw outputs
(the hierarchical tie), and returns ``{task: output}`` bilinearly upsampled to H x W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtseg.tasks.base import Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiTaskModel(nn.Module):
    """Shared backbone and decoder feeding one head per task.

    Args:
        backbone: returns the multi-scale feature list (see :mod:`mtseg.models.backbones`);
            its ``input_mean`` / ``input_std``, when set, normalise the input images.
        decoder: merges it into one stride-4 map (see :mod:`mtseg.models.decoders`).
        tasks: ``{name: Task}``; each builds its head and may refine outputs.
        channels_last: feed the network NHWC tensors (faster convolutions on GPUs with
            tensor cores); the module's weights should be converted too (``build_model`` does).
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module, tasks: dict[str, Task], *, channels_last: bool = False):
        super().__init__()
        if not tasks:
            raise ValueError("tasks.names: the model needs at least one task")
        self.backbone = backbone
        self.decoder = decoder
        self.heads = nn.ModuleDict({name: task.build_head(decoder.out_channels) for name, task in tasks.items()})
        self.tasks = dict(tasks)  # plain objects, not modules: they hold no parameters
        self.channels_last = channels_last
        # Pretrained weights expect the normalisation they were trained with (torchvision's
        # weights.transforms()); random init and local files keep ImageNet's, as always.
        mean = getattr(backbone, "input_mean", None) or IMAGENET_MEAN
        std = getattr(backbone, "input_std", None) or IMAGENET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, *, representation: bool = False):
        """Run every head.

        Args:
            images: (B, 3, H, W) float RGB in [0, 1].
            representation: the heads read a detached copy ``leaf`` of the shared features,
                so that a weighting strategy can take each task's gradient there through the
                heads alone and run the encoder's backward itself (mtseg.weighting.base).

        Returns:
            ``{task: (B, C_task, H, W)}``, in task order; with ``representation``,
            ``(outputs, (features, leaf))``.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"model: expected float images (B, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        size = images.shape[-2:]
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        shared = self.decoder(self.backbone(x))
        leaf = shared.detach().requires_grad_() if representation else shared
        outputs = {name: head(leaf) for name, head in self.heads.items()}
        for task in self.tasks.values():
            task.refine_outputs(outputs)
        outputs = {name: F.interpolate(out, size=size, mode="bilinear", align_corners=False) for name, out in outputs.items()}
        return (outputs, (shared, leaf)) if representation else outputs

    def shared_parameters(self) -> list[nn.Parameter]:
        """Encoder and decoder parameters, in forward order (the last shared layer last)."""
        return list(self.backbone.parameters()) + list(self.decoder.parameters())
