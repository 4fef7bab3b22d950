"""Backbones return four feature maps at strides 4-32; weights come from local files or torch's cache.

Nothing is downloaded here: ``imagenet`` tests point TORCH_HOME at a temporary directory, fill
it with a state dict they make, and replace torch.hub's downloader.
"""

from __future__ import annotations

import os
import types
import urllib.error

import pytest
import torch
import torchvision

from mtseg.config import ConfigError, load_config
from mtseg.data.categories import CategoryIndex
from mtseg.models import IMAGENET_MEAN, available_backbones, build_backbone, build_decoder, build_model
from mtseg.models import backbones as backbones_module
from mtseg.models.backbones import WeightsError, ensure_weights, imagenet_weights, imagenet_weights_file
from mtseg.models.multitask import IMAGENET_STD

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
    with pytest.raises(ConfigError, match="use model.weights=imagenet"):
        build_backbone("resnet50", weights="IMAGENET1K_V2")
    with pytest.raises(ConfigError, match="is a URL.*use model.weights=imagenet"):
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


# ---------------------------------------------------------------------------- model.weights=imagenet

RESNET18_URL = torchvision.models.ResNet18_Weights.DEFAULT.url


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME, and a torch.hub downloader that fails the test if anything calls it."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_download(url, dst, *args, **kwargs):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return home


def _cached_file(home, url: str) -> str:
    # Where torch.hub looks: $TORCH_HOME/hub/checkpoints/<file name of the url>.
    return os.path.join(str(home), "hub", "checkpoints", os.path.basename(url))


def _fill_cache(home, url: str, net: torch.nn.Module) -> str:
    path = _cached_file(home, url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(net.state_dict(), path)  # as torchvision publishes it: classifier included
    return path


def test_imagenet_weights_are_read_from_torch_cache(torch_home):
    reference = torchvision.models.resnet18(weights=None)
    path = _fill_cache(torch_home, RESNET18_URL, reference)
    assert imagenet_weights_file("resnet18") == path
    assert ensure_weights("resnet18", "imagenet", download=True) == path  # present: nothing fetched
    backbone = build_backbone("resnet18", weights="imagenet")
    assert torch.equal(backbone.stages[0][0].weight, reference.conv1.weight)
    assert torch.equal(backbone.stages[3][-1].bn2.running_var, reference.layer4[-1].bn2.running_var)
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert backbone.input_mean == tuple(transform.mean) and backbone.input_std == tuple(transform.std)


def test_imagenet_weights_are_torchvision_defaults():
    assert imagenet_weights("resnet50") is torchvision.models.ResNet50_Weights.DEFAULT
    assert imagenet_weights("mobilenet_v3_large") is torchvision.models.MobileNet_V3_Large_Weights.DEFAULT
    assert ensure_weights("resnet18", "") == "" and ensure_weights("resnet18", "/some/file.pt") == ""


def test_missing_imagenet_file_is_one_line_naming_path_and_url(torch_home):
    path = _cached_file(torch_home, RESNET18_URL)
    for call in (lambda: ensure_weights("resnet18", "imagenet"), lambda: build_backbone("resnet18", weights="imagenet")):
        with pytest.raises(WeightsError) as info:  # a worker: never downloads
            call()
        msg = str(info.value)
        assert "\n" not in msg
        assert path in msg and RESNET18_URL in msg and "TORCH_HOME" in msg


def test_failed_download_in_the_driver_is_the_same_one_line(torch_home, monkeypatch):
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    path = _cached_file(torch_home, RESNET18_URL)
    with pytest.raises(WeightsError) as info:
        ensure_weights("resnet18", "imagenet", download=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert path in msg and RESNET18_URL in msg and "download failed: URLError" in msg
    # One try, into the cache, checked against the hash in the file name as torch.hub does.
    assert calls == [(RESNET18_URL, path, "f37072fd")]
    assert not os.path.exists(path)


def test_driver_download_fills_the_cache_once(torch_home, monkeypatch):
    reference = torchvision.models.resnet18(weights=None)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = ensure_weights("resnet18", "imagenet", download=True)
    assert path == _cached_file(torch_home, RESNET18_URL) and os.path.isfile(path)
    assert ensure_weights("resnet18", "imagenet", download=True) == path
    assert calls == [RESNET18_URL]


def test_a_cached_file_of_another_backbone_does_not_fit(torch_home):
    _fill_cache(torch_home, RESNET18_URL, torchvision.models.resnet34(weights=None))
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth does not fit resnet18"):
        build_backbone("resnet18", weights="imagenet")


CATEGORIES = CategoryIndex.from_categories([{"id": 1, "name": "c1", "supercategory": "s1"}])
MODEL_OVERRIDES = ["tasks.names=[semantic]", "model.decoder_channels=16"]


def test_model_normalises_with_the_weights_transforms(torch_home, monkeypatch):
    _fill_cache(torch_home, RESNET18_URL, torchvision.models.resnet18(weights=None))
    model = build_model(load_config(None, [*MODEL_OVERRIDES, "model.weights=imagenet"]), CATEGORIES)
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert model.mean.flatten().tolist() == torch.tensor(transform.mean).tolist()
    assert model.std.flatten().tolist() == torch.tensor(transform.std).tolist()
    # Read from the weights object, not assumed: other statistics are followed.
    fake = types.SimpleNamespace(
        url=RESNET18_URL, transforms=lambda: types.SimpleNamespace(mean=[0.5, 0.25, 0.75], std=[0.2, 0.3, 0.4])
    )
    monkeypatch.setattr(backbones_module, "imagenet_weights", lambda name: fake)
    model = build_model(load_config(None, [*MODEL_OVERRIDES, "model.weights=imagenet"]), CATEGORIES)
    assert torch.equal(model.mean.flatten(), torch.tensor([0.5, 0.25, 0.75]))
    assert torch.equal(model.std.flatten(), torch.tensor([0.2, 0.3, 0.4]))


def test_random_init_and_local_files_keep_imagenet_normalisation(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    for weights in ("", str(path)):
        model = build_model(load_config(None, [*MODEL_OVERRIDES, f"model.weights={weights}"]), CATEGORIES)
        assert torch.equal(model.mean, torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        assert torch.equal(model.std, torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
