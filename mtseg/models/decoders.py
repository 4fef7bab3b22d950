"""Shared decoders: multi-scale backbone features -> one stride-4 feature map.

Both decoders end in one ``conv_bn_relu`` registered last, so the last entries of
``decoder.parameters()`` are the last shared layer (what GradNorm measures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: BN follows) + BatchNorm + ReLU, padded to keep the spatial size."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FPNDecoder(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017) summed at stride 4 (Panoptic FPN style).

    Args:
        in_channels: channels of the backbone features, shallow (stride 4) to deep.
        channels: width of every decoder layer and of the output.
    """

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels)
        self.fuse = conv_bn_relu(channels, channels)
        self.out_channels = channels

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        size = lat[0].shape[-2:]
        out = self.smooth[0](lat[0])
        for smooth, p in zip(self.smooth[1:], lat[1:]):
            out = out + F.interpolate(smooth(p), size=size, mode="bilinear", align_corners=False)
        return self.fuse(out)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (Chen et al. 2017, DeepLabv3).

    The image-pooling branch has no BatchNorm: its 1x1 map would make BN fail on a
    batch of one image.
    """

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)] + [conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(channels * (len(rates) + 2), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class ASPPDecoder(nn.Module):
    """DeepLabv3+ decoder (Chen et al. 2018): ASPP on the stride-32 feature, fused with stride 4.

    Args:
        in_channels: channels of the backbone features, shallow (stride 4) to deep.
        channels: ASPP and output width.
        rates: atrous rates; DeepLab's (6, 12, 18) are for output stride 16, halved here
            because the backbone is not dilated (output stride 32).
    """

    def __init__(self, in_channels: list[int], channels: int, rates: tuple[int, ...] = (3, 6, 9)):
        super().__init__()
        low = max(channels // 2, 8)
        self.aspp = ASPP(in_channels[-1], channels, rates)
        self.low = conv_bn_relu(in_channels[0], low, 1)
        self.mix = conv_bn_relu(channels + low, channels)
        self.fuse = conv_bn_relu(channels, channels)
        self.out_channels = channels

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        low = self.low(feats[0])
        high = F.interpolate(self.aspp(feats[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(self.mix(torch.cat([high, low], dim=1)))


DECODERS = {"fpn": FPNDecoder, "aspp": ASPPDecoder}


def build_decoder(name: str, in_channels: list[int], channels: int) -> nn.Module:
    """Build a shared decoder.

    Args:
        name: ``"fpn"`` or ``"aspp"``.
        in_channels: backbone feature channels, stride 4 to 32.
        channels: decoder width (``cfg.model.decoder_channels``).

    Returns:
        A module mapping the feature list to one ``(B, channels, H/4, W/4)`` map.
    """
    if name not in DECODERS:
        raise ValueError(f"model.decoder: {name!r} is not one of {', '.join(DECODERS)}")
    return DECODERS[name](in_channels, channels)
