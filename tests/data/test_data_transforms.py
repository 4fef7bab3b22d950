"""Joint augmentation keeps masks aligned with the image; decoding gives RGB; seeds reproduce."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mtseg.data.transforms import apply_joint, build_transform, decode_image, load_image, prepare_image, sample_seed


def _encode(array, fmt="PNG", mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def _painted(h=48, w=64):
    """Two instance masks and an image whose channels 0 and 1 paint them (255 inside, 0 outside)."""
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, 4:30, 6:28] = 1
    masks[1, 20:44, 36:60] = 1
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    image[0] = torch.from_numpy(masks[0] * 255)
    image[1] = torch.from_numpy(masks[1] * 255)
    return image, masks


def _near_edge(mask):
    """Pixels within one pixel (8-neighbourhood) of a change in ``mask``."""
    m = np.pad(mask.astype(bool), 1, mode="edge")
    h, w = mask.shape
    shifted = [m[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.any(shifted, axis=0) != np.all(shifted, axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_crop_and_flip_keep_masks_aligned_with_the_image(seed):
    image, masks = _painted()
    t = build_transform(32, train=True, scale_min=0.3, hflip=True)
    out_img, out_masks = apply_joint(t, image, masks, seed=seed)
    assert out_img.shape == (3, 32, 32) and out_img.dtype == torch.uint8
    assert out_masks.shape == (2, 32, 32) and out_masks.dtype == np.uint8
    for k in range(2):
        painted = out_img[k].numpy()
        # Away from edges (where bilinear blends) the painted channel must equal the mask.
        sure = (painted < 30) | (painted > 225)
        np.testing.assert_array_equal((painted > 127)[sure], out_masks[k].astype(bool)[sure])
        # Nearest (masks) and bilinear (image) may round an edge differently: never by more than a pixel.
        disagree = (painted > 127) != out_masks[k].astype(bool)
        near_edge = _near_edge(out_masks[k])
        assert not (disagree & ~near_edge).any()


def test_flip_moves_image_and_masks_together():
    image, masks = _painted()
    flips = set()
    for seed in range(20):
        t = build_transform(48, train=True, scale_min=1.0, hflip=True)
        out_img, out_masks = apply_joint(t, image, masks, seed=seed)
        # scale_min=1 with ratio near 4/3 keeps almost the whole image; left/right tells flips apart.
        left_heavy = out_masks[0][:, :24].sum() > out_masks[0][:, 24:].sum()
        flips.add(bool(left_heavy))
        assert (out_img[0].numpy()[:, :24].sum() > out_img[0].numpy()[:, 24:].sum()) == left_heavy
    assert flips == {True, False}


def test_validation_is_a_deterministic_plain_resize():
    image, masks = _painted()
    t = build_transform(32, train=False)
    a_img, a_masks = apply_joint(t, image, masks)
    b_img, b_masks = apply_joint(t, image, masks)
    assert a_img.shape == (3, 32, 32)
    assert torch.equal(a_img, b_img) and np.array_equal(a_masks, b_masks)
    # A whole-image resize: mask areas scale by the area ratio.
    ratio = (32 * 32) / (48 * 64)
    assert abs(a_masks[0].sum() - masks[0].sum() * ratio) < 0.1 * masks[0].sum() * ratio


def test_same_seed_same_draw_and_global_rng_untouched():
    image, masks = _painted()
    t = build_transform(32, train=True, scale_min=0.2)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = apply_joint(t, image, masks, seed=sample_seed(0, 1, 42))
    b = apply_joint(t, image, masks, seed=sample_seed(0, 1, 42))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    outs = {apply_joint(t, image, masks, seed=sample_seed(0, e, 42))[0].numpy().tobytes() for e in range(5)}
    assert len(outs) > 1
    assert sample_seed(0, 1, 42) != sample_seed(0, 2, 42) != sample_seed(1, 1, 42)


def test_no_instances():
    image, _ = _painted()
    out_img, out_masks = apply_joint(build_transform(32, train=True), image, np.zeros((0, 48, 64), np.uint8), seed=1)
    assert out_img.shape == (3, 32, 32) and out_masks.shape == (0, 32, 32)


def test_mismatched_mask_size_fails():
    image, masks = _painted()
    with pytest.raises(ValueError, match="masks"):
        apply_joint(build_transform(32, train=False), image, masks[:, :10])


@pytest.mark.parametrize(
    "array,mode,fmt",
    [
        (np.full((9, 7), 100, np.uint8), "L", "PNG"),
        (np.full((9, 7), 100, np.uint8), "L", "JPEG"),
        (np.full((9, 7, 4), 100, np.uint8), "RGBA", "PNG"),
        (np.full((9, 7, 3), 100, np.uint8), "RGB", "JPEG"),
    ],
)
def test_decode_gives_rgb(array, mode, fmt):
    out = decode_image(_encode(array, fmt, mode))
    assert out.shape == (3, 9, 7) and out.dtype == torch.uint8
    assert abs(int(out[:, 4, 3].float().mean()) - 100) <= 3


def test_decode_rejects_garbage():
    with pytest.raises(ValueError, match="image: cannot decode"):
        decode_image(b"not an image")
    with pytest.raises(ValueError, match="image: empty"):
        decode_image(b"")


def test_bad_parameters():
    with pytest.raises(ValueError, match="scale_min"):
        build_transform(32, train=True, scale_min=0.0)
    with pytest.raises(ValueError, match="image_size"):
        build_transform(0, train=False)


# ---------------------------------------------------------------------------- one decoder, 8-bit RGB

RNG = np.random.default_rng(3)
RGB8 = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (6, 5), dtype=np.uint16)
RGB16 = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
INT32 = np.array([[-7, 0, 255, 70000, 65535]] * 6, dtype=np.int32)  # outside 16 bits: clipped
FLOAT = np.linspace(-0.5, 1.5, 30, dtype=np.float32).reshape(6, 5)  # outside [0, 1]: clipped


def _png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _file(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def _pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


_PALETTE = _file(Image.fromarray(RGB8).convert("P"), "PNG")
_LA = _file(Image.fromarray(RGB8).convert("LA"), "PNG")
_BILEVEL = _file(Image.fromarray(RGB8).convert("1"), "PNG")
_CMYK_JPEG = _file(Image.fromarray(RGB8).convert("CMYK"), "JPEG")
_CMYK = Image.fromarray(RGB8).convert("CMYK")

# (file bytes, the 8-bit RGB pixels every stage must see, the format it is converted from or "")
IMAGE_FILES = {
    "png-16bit-gray": (_file(Image.fromarray(GRAY16), "PNG"), _gray3(GRAY16 >> 8), ""),
    "png-16bit-rgb": (_png16_rgb(RGB16), (RGB16 >> 8).astype(np.uint8), ""),
    "png-palette": (_PALETTE, _pil_rgb(_PALETTE), ""),
    "png-gray-alpha": (_LA, _pil_rgb(_LA), ""),
    "png-1bit": (_BILEVEL, _pil_rgb(_BILEVEL), ""),
    "jpeg-cmyk": (_CMYK_JPEG, _pil_rgb(_CMYK_JPEG), ""),
    "bmp": (_file(Image.fromarray(RGB8), "BMP"), RGB8, "BMP"),
    "tiff-rgb": (_file(Image.fromarray(RGB8), "TIFF"), RGB8, "TIFF"),
    "tiff-16bit": (_file(Image.fromarray(GRAY16), "TIFF"), _gray3(GRAY16 >> 8), "TIFF"),
    "tiff-int32": (_file(Image.fromarray(INT32), "TIFF"), _gray3(INT32.clip(0, 65535) >> 8), "TIFF"),
    "tiff-float": (_file(Image.fromarray(FLOAT), "TIFF"), _gray3(np.rint(FLOAT.clip(0, 1) * 255)), "TIFF"),
    "tiff-cmyk": (_file(_CMYK, "TIFF"), np.asarray(_CMYK.convert("RGB")), "TIFF"),
}


def test_sixteen_bit_png_decodes_to_the_8_bit_values_the_model_is_trained_on():
    out = decode_image(_png16_rgb(RGB16))
    assert out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy((RGB16 >> 8).astype(np.uint8)).permute(2, 0, 1))


@pytest.mark.parametrize("name", sorted(IMAGE_FILES))
def test_every_format_and_mode_becomes_8_bit_rgb_the_training_decoder_reads(name):
    data, expected, converted_from = IMAGE_FILES[name]
    stored, pixels, source_format = prepare_image(data)
    assert source_format == converted_from
    assert (stored == data) == (not converted_from)  # readable files are kept as they are
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 6, 5)
    assert np.array_equal(pixels.permute(1, 2, 0).numpy(), expected)
    assert torch.equal(decode_image(stored), pixels)  # what training and predict decode


def test_a_format_the_decoder_does_not_read_says_so():
    with pytest.raises(ValueError, match=r"^image: cannot decode \(Unsupported image file"):
        decode_image(IMAGE_FILES["bmp"][0])
    with pytest.raises(ValueError, match="truncated"):
        prepare_image(_encode(RGB8, "JPEG")[:200])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_image_is_decoded_reduced_and_downscaled(fmt):
    big = np.zeros((1800, 2400, 3), np.uint8)
    big[:, 1200:] = (200, 40, 10)  # two flat halves: large but tiny to encode
    pixels, size = load_image(_encode(big, fmt), max_side=300)
    assert size == (1800, 2400)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 225, 300)
    assert pixels[:, 100, 50].tolist() == [0, 0, 0]
    assert abs(pixels[0, 100, 250].item() - 200) <= 3
    small, size = load_image(_encode(RGB8, fmt), max_side=300)  # within the limit: as in training
    assert size == (6, 5) and torch.equal(small, decode_image(_encode(RGB8, fmt)))
