"""torchvision backbones cut into four stages returning features at strides 4, 8, 16, 32.

The classifier is dropped so that a forward pass uses every parameter (DDP must not find
unused ones). Weights start from random init or a local state_dict file; nothing is
ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torchvision
from torch import nn

# Names of torchvision's pretrained weight enums: a config naming one expects a hub
# download, which this project never does.
_HUB_WEIGHT_NAMES = ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2")


class Backbone(nn.Module):
    """A feature extractor returning ``[C2, C3, C4, C5]``; ``out_channels`` lists their widths."""

    def __init__(self, stages: list[nn.Module], out_channels: list[int]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def _resnet_stages(net: torchvision.models.ResNet) -> tuple[list[nn.Module], list[int]]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    stages = [stem, net.layer2, net.layer3, net.layer4]
    return stages, [_last_out_channels(s) for s in stages]


def _mobilenet_stages(net: torchvision.models.MobileNetV3) -> tuple[list[nn.Module], list[int]]:
    f = net.features
    # Cut where the stride doubles (checked by tests/models/test_models_backbones.py).
    bounds = [(0, 4), (4, 7), (7, 13), (13, len(f))]
    stages = [nn.Sequential(*f[a:b]) for a, b in bounds]
    return stages, [_last_out_channels(s) for s in stages]


def _last_out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


_BUILDERS: dict[str, tuple[Callable[..., nn.Module], Callable]] = {
    "resnet18": (torchvision.models.resnet18, _resnet_stages),
    "resnet34": (torchvision.models.resnet34, _resnet_stages),
    "resnet50": (torchvision.models.resnet50, _resnet_stages),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, _mobilenet_stages),
}

# Classifier keys of the full torchvision models; a weights file may carry them or not.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def available_backbones() -> tuple[str, ...]:
    """Names accepted by :func:`build_backbone`."""
    return tuple(_BUILDERS)


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A local state_dict file (or one under ``state_dict`` / ``model``), ``module.`` prefixes stripped."""
    if path in _HUB_WEIGHT_NAMES or "://" in path:
        raise ValueError(
            f"model.weights: {path!r} would need a download, which mtseg never does; "
            "give a local state_dict file or leave it empty for random init"
        )
    if not os.path.isfile(path):
        raise ValueError(f"model.weights: file not found: {path} (nothing is downloaded; empty = random init)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ValueError(f"model.weights: cannot read {path}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights: {path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_backbone(name: str, *, weights: str = "") -> Backbone:
    """Build a torchvision backbone returning features at strides 4, 8, 16 and 32.

    Args:
        name: one of :func:`available_backbones`.
        weights: local state_dict file of the torchvision model (classifier keys ignored);
            empty for random init.

    Returns:
        The :class:`Backbone`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"model.backbone: {name!r} is not one of {', '.join(_BUILDERS)}")
    builder, cut = _BUILDERS[name]
    net = builder(weights=None)
    if weights:
        state = _load_weights_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
        expected = {k for k in net.state_dict() if not k.startswith(_CLASSIFIER_PREFIXES)}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"model.weights: {weights} does not fit {name}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        try:
            net.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise ValueError(f"model.weights: {weights} does not fit {name}: {str(e).splitlines()[-1].strip()}") from None
    stages, channels = cut(net)
    return Backbone(stages, channels)
