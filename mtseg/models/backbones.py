"""torchvision backbones cut into four stages returning features at strides 4, 8, 16, 32.

The classifier is dropped so that a forward pass uses every parameter (DDP must not find
unused ones). Weights start from random init, a local state_dict file, or (``imagenet``) the
backbone's default ImageNet weights from torch's cache, ``$TORCH_HOME/hub/checkpoints/``.
Only the driver may fill that cache (:func:`ensure_weights`, before Ray starts); building a
backbone never downloads, so a worker missing the file fails with the driver's message.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from mtseg.config import IMAGENET_WEIGHTS, check_weights_value
from mtseg.errors import MtsegError


class WeightsError(MtsegError, ValueError):
    """``model.weights`` cannot be used (missing, unreadable, or not this backbone's); one line naming the file."""


class Backbone(nn.Module):
    """A feature extractor returning ``[C2, C3, C4, C5]``; ``out_channels`` lists their widths.

    ``input_mean`` / ``input_std`` are the RGB normalisation its weights were trained with, when
    they say (torchvision's ``weights.transforms()``); None leaves the choice to the model.
    """

    def __init__(
        self,
        stages: list[nn.Module],
        out_channels: list[int],
        *,
        input_mean: tuple[float, ...] | None = None,
        input_std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(out_channels)
        self.input_mean = input_mean
        self.input_std = input_std

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


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"model.backbone: {name!r} is not one of {', '.join(_BUILDERS)}")


def imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    """torchvision's default ImageNet weights of backbone ``name`` (``ResNet50_Weights.DEFAULT``, ...).

    Args:
        name: one of :func:`available_backbones`.

    Returns:
        The weights enum member: its ``url`` names the file, its ``transforms()`` the input
        normalisation.
    """
    _check_name(name)
    return torchvision.models.get_model_weights(name).DEFAULT


def imagenet_weights_file(name: str) -> str:
    """Where torch's cache keeps backbone ``name``'s ImageNet weights.

    The path ``torch.hub.load_state_dict_from_url`` (and so torchvision's ``get_state_dict``)
    reads and downloads to: ``<torch.hub.get_dir()>/checkpoints/<file name of the url>``, i.e.
    ``$TORCH_HOME/hub/checkpoints/...`` (``~/.cache/torch`` when TORCH_HOME is unset).

    Args:
        name: one of :func:`available_backbones`.

    Returns:
        The absolute file path (it may not exist).
    """
    url = imagenet_weights(name).url
    file_name = os.path.basename(urllib.parse.urlparse(url).path)
    return os.path.abspath(os.path.join(torch.hub.get_dir(), "checkpoints", file_name))


def _missing_imagenet_file(name: str, path: str, why: str) -> WeightsError:
    url = imagenet_weights(name).url
    return WeightsError(
        f"model.weights=imagenet: {name}'s ImageNet weights are not in torch's cache: {path} is missing ({why}); "
        f"put the file from {url} there, or set TORCH_HOME to a directory whose hub/checkpoints/ has it"
    )


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def ensure_weights(name: str, weights: str, *, download: bool = False) -> str:
    """Make sure the weights :func:`build_backbone` will read are there, before any worker starts.

    Only ``imagenet`` needs anything: its file must be in torch's cache. Call this in the driver
    with ``download=True`` (a cluster node with internet fetches the file once, SHA-256 prefix
    checked as torch.hub does); workers only read the cache. A local file is checked where it is
    read, as before.

    Args:
        name: one of :func:`available_backbones`.
        weights: ``model.weights``: ``""``, ``"imagenet"`` or a local file.
        download: fetch a missing ImageNet file from its url (torchvision's, into the cache).

    Returns:
        The cached ImageNet file, or ``""`` when ``weights`` is not ``imagenet``.

    Raises:
        WeightsError: the ImageNet file is missing and not downloaded (one line naming the
            path and the url to fetch it from).
        ConfigError: ``weights`` is a torchvision weights name or a URL.
    """
    check_weights_value(weights)
    if weights != IMAGENET_WEIGHTS:
        return ""
    path = imagenet_weights_file(name)
    if os.path.isfile(path):
        return path
    if not download:
        raise _missing_imagenet_file(name, path, "not downloaded here: only the driver fetches it, before training starts")
    url = imagenet_weights(name).url
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Into a temp file, then renamed: a broken download never leaves a file that looks whole.
        torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None, progress=True)
    except Exception as e:  # noqa: BLE001 - no network, refused, wrong hash, disk full: the same one line
        raise _missing_imagenet_file(name, path, f"download failed: {_one_line(e)}") from None
    return path


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict file (or one under ``state_dict`` / ``model``), ``module.`` prefixes stripped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise WeightsError(f"model.weights: cannot read {path}: {_one_line(e)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"model.weights: {path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A local state_dict file, read as :func:`_read_state_dict` reads it."""
    if not os.path.isfile(path):
        raise WeightsError(f"model.weights: file not found: {path} (nothing is downloaded; empty = random init)")
    return _read_state_dict(path)


def _load_backbone_state(net: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Load ``state`` into ``net`` but for the classifier, which a weights file may carry or not."""
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    expected = {k for k in net.state_dict() if not k.startswith(_CLASSIFIER_PREFIXES)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"model.weights: {source} does not fit {name}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise WeightsError(f"model.weights: {source} does not fit {name}: {str(e).splitlines()[-1].strip()}") from None


def build_backbone(name: str, *, weights: str = "") -> Backbone:
    """Build a torchvision backbone returning features at strides 4, 8, 16 and 32.

    Never downloads: ``imagenet`` reads torch's cache, which :func:`ensure_weights` fills in
    the driver.

    Args:
        name: one of :func:`available_backbones`.
        weights: ``"imagenet"`` for torchvision's default ImageNet weights of ``name``, a local
            state_dict file of the torchvision model (classifier keys ignored), or empty for
            random init.

    Returns:
        The :class:`Backbone`; with ``imagenet``, its ``input_mean`` / ``input_std`` are the
        weights' own (``transforms().mean`` / ``.std``).

    Raises:
        ValueError: an unknown backbone name.
        ConfigError: ``weights`` is a torchvision weights name or a URL.
        WeightsError: the file is missing, unreadable, or does not fit ``name``.
    """
    _check_name(name)
    check_weights_value(weights)
    builder, cut = _BUILDERS[name]
    net = builder(weights=None)
    mean = std = None
    if weights == IMAGENET_WEIGHTS:
        source = ensure_weights(name, weights, download=False)
        state = _read_state_dict(source)
        transform = imagenet_weights(name).transforms()
        mean, std = tuple(float(v) for v in transform.mean), tuple(float(v) for v in transform.std)
    elif weights:
        source = weights
        state = _load_weights_file(weights)
    if weights:
        _load_backbone_state(net, state, name, source)
    stages, channels = cut(net)
    return Backbone(stages, channels, input_mean=mean, input_std=std)
