"""Backbones return four feature maps at strides 4-32; weights come only from local files."""

from __future__ import annotations

import pytest
import torch
import torchvision

from mtseg.models import available_backbones, build_backbone, build_decoder

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("name", available_backbones())
def test_backbone_strides_and_channels(name):
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        feats = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == backbone.out_channels


def test_classifier_is_left_out():
    backbone = build_backbone("resnet18")
    names = [n for n, _ in backbone.named_parameters()]
    assert not any(".fc." in n or n.startswith("fc.") for n in names)
    full = sum(p.numel() for p in torchvision.models.resnet18(weights=None).parameters())
    assert sum(p.numel() for p in backbone.parameters()) == full - (512 * 1000 + 1000)


@pytest.mark.parametrize("decoder", ["fpn", "aspp"])
def test_decoder_output_stride_4(decoder):
    backbone = build_backbone("resnet18")
    dec = build_decoder(decoder, backbone.out_channels, 32)
    out = dec(backbone(torch.rand(2, 3, 64, 64)))
    assert out.shape == (2, 32, 16, 16)


def test_local_weights_file_is_loaded(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    backbone = build_backbone("resnet18", weights=str(path))
    assert torch.equal(backbone.stages[0][0].weight, reference.conv1.weight)
    assert torch.equal(backbone.stages[3][-1].conv2.weight, reference.layer4[-1].conv2.weight)


def test_weights_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="file not found.*nothing is downloaded"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="would need a download"):
        build_backbone("resnet50", weights="IMAGENET1K_V2")
    with pytest.raises(ValueError, match="would need a download"):
        build_backbone("resnet50", weights="https://download.pytorch.org/models/resnet50.pth")
    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        build_backbone("resnet18", weights=str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        build_backbone("resnet18", weights=str(junk))
    with pytest.raises(ValueError, match="model.backbone"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="model.decoder"):
        build_decoder("unet", [8, 16, 32, 64], 8)
