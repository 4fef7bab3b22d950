"""Image decoding and joint augmentation of an image with its instance masks.

The geometry is torchvision.transforms.v2's: the image travels as a ``tv_tensors.Image`` and
the instance masks as one ``tv_tensors.Mask`` (N, H, W), so a single call crops, resizes and
flips both with the same parameters (masks with nearest interpolation, the image with
antialiased bilinear). Targets are built afterwards, at the model's input size, so that the
boundary width and center sigma are in output pixels.

* train: ``RandomResizedCrop(size, scale=(scale_min, 1), ratio=(3/4, 4/3))`` then
  ``RandomHorizontalFlip``;
* validation: ``Resize((size, size))``, no crop, so predictions map back to ``orig_size``.

Random draws are reproducible: each image's parameters come from a seed derived from
(seed, epoch, image_id) (:func:`sample_seed`), independent of which worker handles it.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image as _tv_decode_image
from torchvision.transforms import v2

#: Aspect-ratio range of the random crop (torchvision's default).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def decode_image(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes (JPEG, PNG, ...) to RGB.

    Grayscale, palette and RGBA inputs come back as 3-channel RGB. EXIF orientation is not
    applied: COCO annotations are in the stored pixel orientation.

    Args:
        data: the encoded file, as stored in a shard's ``image`` column.

    Returns:
        uint8 tensor (3, H, W).

    Raises:
        ValueError: the bytes are empty or not a decodable image.
    """
    if not data:
        raise ValueError("image: empty bytes")
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return _tv_decode_image(buf, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"image: cannot decode ({str(e).splitlines()[0]})") from None


def build_transform(image_size: int, *, train: bool, scale_min: float = 0.5, hflip: bool = True) -> v2.Transform:
    """The joint image + mask transform.

    Args:
        image_size: output side, pixels (output is square).
        train: random crop and flip when True; a plain resize when False.
        scale_min: smallest crop area as a fraction of the image (train only), in (0, 1].
        hflip: flip horizontally with probability 0.5 (train only).

    Returns:
        A v2 transform taking ``(tv_tensors.Image, tv_tensors.Mask)`` and returning both.

    Raises:
        ValueError: image_size < 1 or scale_min outside (0, 1].
    """
    if image_size < 1:
        raise ValueError(f"image_size: must be >= 1, got {image_size}")
    if not 0.0 < scale_min <= 1.0:
        raise ValueError(f"scale_min: must lie in (0, 1], got {scale_min}")
    if not train:
        return v2.Resize((image_size, image_size), antialias=True)
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(image_size, scale=(scale_min, 1.0), ratio=CROP_RATIO, antialias=True)
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps)


def sample_seed(seed: int, epoch: int, image_id: int) -> int:
    """A 63-bit seed for one image in one epoch, well mixed from the three integers."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFFFFFF])
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def apply_joint(
    transform: v2.Transform,
    image: torch.Tensor,
    masks: np.ndarray,
    *,
    seed: int | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Apply ``transform`` to an image and its instance masks with the same random parameters.

    Args:
        transform: from :func:`build_transform`.
        image: uint8 (3, H, W).
        masks: (N, H, W) binary masks of the same H, W; N may be 0.
        seed: when given, the random draws are made from this seed (in a forked RNG, so the
            global torch RNG is left as it was); None uses the global RNG. The draws go
            through torch's process-wide CPU generator, so threads must not share it while
            this runs (Ray tasks and DataLoader workers run one sample at a time).

    Returns:
        ``image`` uint8 (3, S, S) and ``masks`` uint8 numpy (N, S, S).

    Raises:
        ValueError: the image and masks differ in size.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected (3, H, W), got shape {tuple(image.shape)}")
    if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(f"masks: shape {masks.shape} does not match the image size {tuple(image.shape[1:])}")
    img = tv_tensors.Image(image)
    msk = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)))
    if seed is None:
        out_img, out_msk = transform(img, msk)
    else:
        # v2 draws from torch's global CPU generator; fork it so a per-image seed does not leak
        # out. Seed only that generator: torch.manual_seed also queues a seed for every
        # accelerator backend, recording a stack trace each time (half the cost of a 64 px image).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            out_img, out_msk = transform(img, msk)
    return out_img.as_subclass(torch.Tensor), out_msk.as_subclass(torch.Tensor).numpy()


__all__ = ["CROP_RATIO", "apply_joint", "build_transform", "decode_image", "sample_seed"]
