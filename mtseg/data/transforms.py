"""Image decoding and joint augmentation of an image with its instance masks.

**One decoder.** :func:`decode_image` (torchvision's, on libjpeg-turbo, libpng, libwebp and
giflib) is what training, evaluation and predict decode with, and so what decides whether an
image is readable. ``mtseg data shard`` checks every image with it; an image in a format it
cannot read (BMP, TIFF, ... whatever PIL opens) is converted there by :func:`prepare_image`,
once, to a lossless PNG of the same 8-bit RGB pixels, and ``mtseg predict`` converts such
files the same way. Pixels always reach the model as 8-bit RGB, with every mode converted
explicitly (16-bit to 8-bit by dropping the low byte, as torchvision's ``to_dtype`` does).

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

import io
import math

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode_image
from torchvision.transforms import v2

#: Aspect-ratio range of the random crop (torchvision's default).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

#: PIL modes holding more than 8 bits per pixel, taken as 16-bit samples (PIL opens 16-bit
#: PNG and TIFF files as ``I;16*`` or ``I``).
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _decoder_message(error: Exception) -> str:
    # torchvision prefixes its messages with "function, source.cpp:line, "; the user needs the rest.
    return str(error).splitlines()[0].split(".cpp:", 1)[-1].split(", ", 1)[-1]


def decode_image(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes (JPEG, PNG, WebP, GIF) to 8-bit RGB: the one decoder.

    Grayscale, palette, CMYK and alpha inputs come back as 3-channel RGB (alpha dropped);
    16-bit PNGs are reduced to 8 bits (``value >> 8``). EXIF orientation is not applied: COCO
    annotations are in the stored pixel orientation.

    Args:
        data: the encoded file, as stored in a shard's ``image`` column.

    Returns:
        uint8 tensor (3, H, W).

    Raises:
        ValueError: the bytes are empty, not an image, truncated, or in a format this decoder
            does not read (:func:`prepare_image` converts those).
    """
    if not data:
        raise ValueError("image: empty bytes")
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = _tv_decode_image(buf, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"image: cannot decode ({_decoder_message(e)})") from None
    if image.dtype != torch.uint8:
        # A 16-bit PNG decodes to uint16; the model is trained on 8-bit values scaled to [0, 1].
        image = v2.functional.to_dtype(image, torch.uint8, scale=True)
    return image


def _to_rgb8(img):
    """A PIL image in any mode -> an 8-bit RGB PIL image, by explicit rules.

    ``I``/``I;16*`` are 16-bit samples, reduced like :func:`decode_image` reduces 16-bit PNGs;
    ``F`` holds floats in [0, 1] (torchvision's convention for float images), clipped; every
    other mode (``1``, ``L``, ``P``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``, ...) goes through
    PIL's own conversion to RGB, which drops alpha as the decoder does.
    """
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.int64).clip(0, 65535) >> 8
    elif img.mode == "F":
        values = np.rint(np.nan_to_num(np.asarray(img, dtype=np.float64)).clip(0.0, 1.0) * 255.0)
    else:
        return img if img.mode == "RGB" else img.convert("RGB")
    gray = values.astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def _pil_open(data: bytes, *, reduce_to: tuple[int, int] | None = None):
    """The image PIL decodes from ``data``, every pixel loaded; ValueError when it cannot.

    ``reduce_to``: (width, height) a JPEG may be decoded down to, at 1/2, 1/4 or 1/8 scale
    (PIL ``draft``, DCT scaling), never below it; other formats decode whole.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if reduce_to:
            img.draft("RGB", reduce_to)
        img.load()  # every pixel: a header alone says nothing about truncation
        return img
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"image: cannot decode ({(str(e).splitlines() or [type(e).__name__])[0]})") from None


def prepare_image(data: bytes) -> tuple[bytes, torch.Tensor, str]:
    """Bytes :func:`decode_image` reads, converting the file when it is in another format.

    An image the decoder reads is kept as it is. One it cannot read but PIL can (BMP, TIFF,
    ...) is converted to 8-bit RGB (see :func:`_to_rgb8`) and re-encoded as PNG: lossless, so
    the model sees exactly the pixels PIL decoded and the pixel-exact annotations still fit;
    JPEG would add a second round of compression artefacts to an image that has none.

    Args:
        data: the encoded file.

    Returns:
        ``(data, pixels, "")`` for a file the decoder reads, or ``(png, pixels, format)`` for a
        converted one (``format`` as PIL names it: ``"BMP"``, ``"TIFF"``, ...); ``pixels`` is
        the uint8 (3, H, W) decode of the returned bytes.

    Raises:
        ValueError: neither the decoder nor PIL can read it (the decoder's reason, e.g.
            truncated), or it is empty.
    """
    try:
        return data, decode_image(data), ""
    except ValueError as native:
        try:
            img = _pil_open(data)
        except ValueError:
            raise native from None
        source_format = img.format or "unknown format"
        buf = io.BytesIO()
        try:
            _to_rgb8(img).save(buf, format="PNG")
        except (ValueError, OSError) as e:  # a mode PIL cannot turn into RGB (e.g. LAB)
            raise ValueError(f"image: cannot convert {source_format} mode {img.mode} to RGB ({e})") from None
        png = buf.getvalue()
        return png, decode_image(png), source_format


def load_image(data: bytes, *, max_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode an image for inference, downscaled to fit ``max_side`` when it is larger.

    An image within the limit decodes exactly as in training (:func:`prepare_image`). A larger
    one is decoded reduced where the format allows (JPEG's DCT scaling, PIL ``draft``: a
    12000 px photo decodes at 1/2..1/8 of the size, in a fraction of the memory and time)
    and then resized with PIL's ``thumbnail``, keeping the aspect ratio.

    Args:
        data: the encoded file.
        max_side: the largest height or width returned; None for no limit.

    Returns:
        ``(pixels, (height, width))``: uint8 (3, h, w) RGB pixels and the image's own size
        (larger than ``(h, w)`` when it was downscaled).

    Raises:
        ValueError: not a readable image.
    """
    if max_side:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                size = probe.size
        except Exception:  # noqa: BLE001 - not an image PIL knows: prepare_image says why
            size = (0, 0)
        if max(size) > max_side:
            scale = max_side / max(size)
            small = _to_rgb8(_pil_open(data, reduce_to=(math.ceil(size[0] * scale), math.ceil(size[1] * scale))))
            small.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.array(small, dtype=np.uint8)).permute(2, 0, 1).contiguous()
            return pixels, (size[1], size[0])
    _, pixels, _ = prepare_image(data)
    return pixels, (int(pixels.shape[1]), int(pixels.shape[2]))


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
    steps: list[v2.Transform] = [v2.RandomResizedCrop(image_size, scale=(scale_min, 1.0), ratio=CROP_RATIO, antialias=True)]
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
        masks: (N, H, W) binary masks of the same H, W (N may be 0), or int32 id maps.
        seed: when given, the random draws are made from this seed (in a forked RNG, so the
            global torch RNG is left as it was); None uses the global RNG. The draws go
            through torch's process-wide CPU generator, so threads must not share it while
            this runs (Ray tasks and DataLoader workers run one sample at a time).

    Returns:
        ``image`` uint8 (3, S, S) and ``masks`` numpy (N, S, S), uint8 (int32 for int32 input).

    Raises:
        ValueError: the image and masks differ in size.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected (3, H, W), got shape {tuple(image.shape)}")
    if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(f"masks: shape {masks.shape} does not match the image size {tuple(image.shape[1:])}")
    img = tv_tensors.Image(image)
    # int32 id maps (mtseg.data.targets.id_layers with 255+ ids) keep their ids; nearest
    # resampling picks the same source pixels for every integer dtype.
    dtype = np.int32 if masks.dtype == np.int32 else np.uint8
    msk = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(masks, dtype=dtype)))
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


__all__ = ["CROP_RATIO", "apply_joint", "build_transform", "decode_image", "load_image", "prepare_image", "sample_seed"]
