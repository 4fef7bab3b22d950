"""Joint augmentation keeps masks aligned with the image; decoding gives RGB; seeds reproduce."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mtseg.data.transforms import apply_joint, build_transform, decode_image, sample_seed


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
