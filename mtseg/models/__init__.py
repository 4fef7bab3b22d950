"""Feature extraction: torchvision backbones, shared decoders, the multi-task model.

model = build_model(cfg, categories)
outputs = model(images)      # {task: output at input resolution}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mtseg.models.backbones import available_backbones, build_backbone
from mtseg.models.decoders import build_decoder
from mtseg.models.multitask import IMAGENET_MEAN, MultiTaskModel
from mtseg.tasks import build_tasks

if TYPE_CHECKING:
    from mtseg.config import Config
    from mtseg.data.categories import CategoryIndex


def build_model(cfg: Config, categories: CategoryIndex) -> MultiTaskModel:
    """Build the multi-task model the config describes.

    Args:
        cfg: resolved config (``cfg.model`` and ``cfg.tasks``).
        categories: the dataset's label spaces (category and supercategory counts, hierarchy).

    Returns:
        The model, on CPU, in channels_last memory format when ``cfg.model.channels_last``.
    """
    tasks = build_tasks(cfg, categories)
    backbone = build_backbone(cfg.model.backbone, weights=cfg.model.weights)
    decoder = build_decoder(cfg.model.decoder, backbone.out_channels, cfg.model.decoder_channels)
    model = MultiTaskModel(backbone, decoder, tasks, channels_last=cfg.model.channels_last)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = [
    "IMAGENET_MEAN",
    "MultiTaskModel",
    "available_backbones",
    "build_backbone",
    "build_decoder",
    "build_model",
]
