"""Common image corruptions for robustness evaluation: ImageNet-C's 15, as COCO-C applies them.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019) define 15 corruptions in four families at severities 1-5;
Michaelis et al., "Benchmarking Robustness in Object Detection" (2019) apply them to COCO's
original images (COCO-C) and report mPC (the mean over corruptions and severities) and
rPC = mPC / clean. The corruptions themselves are the maintained ``imagecorruptions``
package's (the ``imagecorruptions-imaug`` fork: the authors' 1.1.2 does not import without
``pkg_resources``), imported on first use: it pulls in numba, OpenCV and scikit-image.

**Deterministic.** :func:`corrupt` gives the same bytes for the same (image key, corruption,
severity), whichever worker, thread or order it runs in. The library draws from three places,
each seeded from a hash of that triple: numpy's global generator (noise, motion, snow, frost,
fog, elastic), scikit-image's ``rng`` argument (impulse noise) and numba's own generator
(glass blur's pixel shuffle, seeded inside the compiled function). numpy's global generator
is seeded under a lock and its previous state restored afterwards, so the caller's draws are
neither disturbed nor able to disturb a corruption. The rest (defocus, zoom, brightness,
contrast, pixelate, JPEG) draw nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable

import numpy as np

from mtseg.errors import MtsegError

#: The benchmark corruptions, in Hendrycks & Dietterich's order, with their family (theirs and
#: the library's: brightness is weather, as sunlight).
CORRUPTIONS: dict[str, str] = {
    "gaussian_noise": "noise",
    "shot_noise": "noise",
    "impulse_noise": "noise",
    "defocus_blur": "blur",
    "glass_blur": "blur",
    "motion_blur": "blur",
    "zoom_blur": "blur",
    "snow": "weather",
    "frost": "weather",
    "fog": "weather",
    "brightness": "weather",
    "contrast": "digital",
    "elastic_transform": "digital",
    "pixelate": "digital",
    "jpeg_compression": "digital",
}
FAMILIES = ("noise", "blur", "weather", "digital")
SEVERITIES = (1, 2, 3, 4, 5)
#: The library refuses smaller images (its blur kernels and frost crops assume this much).
MIN_SIDE = 32

# Corruptions whose draws the library takes from a ``seed`` argument instead of numpy's global
# generator: impulse noise (scikit-image's random_noise) and glass blur (numba's generator).
_SEED_ARGUMENT = ("impulse_noise", "glass_blur")

# numpy's global generator is process-wide: two threads corrupting at once would interleave draws.
_RNG_LOCK = threading.Lock()


class CorruptionError(MtsegError, ValueError):
    """An unknown corruption or severity, or an image the corruptions cannot take."""


def _allowed_names() -> str:
    return ", ".join(CORRUPTIONS)


def check_corruptions(names: Iterable[str]) -> tuple[str, ...]:
    """The names, each known, duplicates dropped, in the given order.

    Raises:
        CorruptionError: none given, or a name not in :data:`CORRUPTIONS` (the message lists them).
    """
    names = tuple(dict.fromkeys(str(n) for n in names))
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        what = f"unknown {', '.join(unknown)}" if unknown else "none given"
        raise CorruptionError(f"--corruptions: {what}; expected all or a comma-separated list of: {_allowed_names()}")
    return names


def check_severities(values: Iterable[int]) -> tuple[int, ...]:
    """The severities, each in 1-5, sorted, duplicates dropped.

    Raises:
        CorruptionError: none given, or one outside 1-5.
    """
    values = tuple(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v not in SEVERITIES]
    if bad or not values:
        what = f"got {', '.join(map(str, bad))}" if bad else "none given"
        raise CorruptionError(f"--severities: {what}; expected 1-5 or a comma-separated list of severities 1 to 5 (e.g. 1,3)")
    return tuple(sorted({int(v) for v in values}))


def parse_corruptions(text: str) -> tuple[str, ...]:
    """``--corruptions``: ``all`` (the 15, in benchmark order) or comma-separated names as the library spells them.

    Args:
        text: e.g. ``"all"`` or ``"gaussian_noise,jpeg_compression"``.

    Returns:
        The names, duplicates dropped.

    Raises:
        CorruptionError: an unknown name or an empty list, in one line listing the names allowed.
    """
    text = str(text).strip()
    if text == "all":
        return tuple(CORRUPTIONS)
    return check_corruptions(part.strip() for part in text.split(",") if part.strip())


def parse_severities(text: str) -> tuple[int, ...]:
    """``--severities``: comma-separated severities and ranges, e.g. ``1-5``, ``3`` or ``1,3-4``.

    Returns:
        The severities, sorted, duplicates dropped.

    Raises:
        CorruptionError: not a severity or range of severities 1 to 5, in one line.
    """
    values: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise CorruptionError(
                f"--severities: cannot read {part!r}; expected 1-5 or a comma-separated list of severities 1 to 5 (e.g. 1,3)"
            ) from None
        if first > last:
            raise CorruptionError(f"--severities: the range {part!r} runs backwards; expected e.g. 1-5")
        values += range(first, last + 1)
    return check_severities(values)


def corruption_seed(key: int | str, name: str, severity: int) -> int:
    """The 32-bit seed of one (image, corruption, severity): a hash, the same in every process."""
    digest = hashlib.blake2b(f"{key}\x00{name}\x00{int(severity)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def corrupt(pixels: np.ndarray, name: str, severity: int, key: int | str) -> np.ndarray:
    """One image corrupted as ImageNet-C / COCO-C do it, deterministically.

    Args:
        pixels: uint8 (H, W, 3) RGB, H and W at least :data:`MIN_SIDE`; not modified.
        name: one of :data:`CORRUPTIONS`.
        severity: 1-5; 0 returns ``pixels`` itself (the clean image).
        key: what tells images apart, e.g. the COCO image id; with ``name`` and ``severity``
            it seeds every random draw (:func:`corruption_seed`).

    Returns:
        uint8 (H, W, 3), a new array (the library's own rounding: values truncated to integers).

    Raises:
        CorruptionError: an unknown corruption or severity, or not a uint8 (H, W, 3) image of the size needed.
    """
    check_corruptions([name])
    if severity == 0:
        return pixels
    check_severities([severity])
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise CorruptionError(f"{name}: expected uint8 (H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
    if min(pixels.shape[:2]) < MIN_SIDE:
        raise CorruptionError(
            f"{name}: the image is {pixels.shape[1]}x{pixels.shape[0]} pixels; corruptions need at least {MIN_SIDE}x{MIN_SIDE}"
        )
    from imagecorruptions import corrupt as library_corrupt

    seed = corruption_seed(key, name, severity)
    kwargs = {"seed": seed} if name in _SEED_ARGUMENT else {}
    image = np.ascontiguousarray(pixels)
    with _RNG_LOCK:
        saved = np.random.get_state()
        np.random.seed(seed)
        try:
            out = library_corrupt(image, severity=int(severity), corruption_name=name, **kwargs)
        finally:
            np.random.set_state(saved)
    if out.shape != pixels.shape:  # the library pads or crops some zooms itself; a mismatch is a bug to see
        raise CorruptionError(f"{name} {severity}: the library returned {out.shape} for an image of {pixels.shape}")
    return out
