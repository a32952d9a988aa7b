"""Technical checks that need no model: is there a picture here at all?

A generation can fail without any error: a VAE that overflowed in fp16 decodes to NaN (shown as a
black frame), a sampler with zero denoise returns flat noise-free colour, an upscaler returns a
thumbnail. These checks catch that before CLIP is asked anything.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, UnidentifiedImageError

from quality.types import ImageInput

__all__ = [
    "DecodedImage",
    "TechnicalCheck",
    "TechnicalLimits",
    "TechnicalReport",
    "check_image",
    "decode_and_check",
    "decode_image",
    "decode_rgb_array",
    "judge_batch",
    "judge_pixels",
    "judge_resized",
]


_STATS_SIDE = 128
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L" conversion


class TechnicalCheck(enum.StrEnum):
    UNDECODABLE = "undecodable"  # bytes that are no image Pillow can read
    NON_FINITE = "non_finite"  # NaN or infinity in a float image (a VAE that overflowed)
    TOO_SMALL = "too_small"  # a side shorter than the limit
    UNIFORM = "uniform"  # blank: (almost) one colour everywhere
    NEAR_BLACK = "near_black"  # mean brightness at the bottom of the range
    NEAR_WHITE = "near_white"  # mean brightness at the top of the range


@dataclass(frozen=True, slots=True)
class TechnicalLimits:
    """Where a picture stops being one. Brightness and spread are on the 0..255 scale."""

    min_side: int = 64
    #: Standard deviation of luminance below which an image counts as uniform (blank).
    min_std: float = 2.0
    #: Mean luminance at or below which an image is near-black; at or above which, near-white.
    dark_mean: float = 6.0
    bright_mean: float = 249.0
    #: Share of non-finite pixels tolerated in a float image (0: any NaN fails).
    max_non_finite: float = 0.0


@dataclass(frozen=True, slots=True)
class TechnicalReport:
    """What the checks found; ``ok`` when nothing failed. ``mean``/``std`` are of luminance, 0..255."""

    failures: tuple[TechnicalCheck, ...]
    width: int
    height: int
    mean: float
    std: float

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "failures": [str(f) for f in self.failures], "width": self.width,
                "height": self.height, "mean": round(self.mean, 3), "std": round(self.std, 3)}


def decode_image(image: ImageInput) -> tuple[Image.Image | None, npt.NDArray[np.float32] | None]:
    """(an RGB PIL image or None when undecodable, the float array it came from when it was one)."""
    if isinstance(image, Image.Image):
        if image.mode == "F":
            return None, np.asarray(image, dtype=np.float32)[..., None].repeat(3, axis=2) / 255.0
        return (image if image.mode == "RGB" else image.convert("RGB")), None
    if isinstance(image, bytes | bytearray | memoryview):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return opened.convert("RGB"), None
        except (UnidentifiedImageError, OSError, ValueError):
            return None, None
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None].repeat(3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image array must be H×W×C with 1, 3 or 4 channels, not {arr.shape}")
    if arr.shape[2] == 1:
        arr = arr.repeat(3, axis=2)
    arr = arr[..., :3]
    if np.issubdtype(arr.dtype, np.floating):
        return None, arr.astype(np.float32)
    return Image.fromarray(arr.astype(np.uint8), "RGB"), None


def _float_to_pil(arr: npt.NDArray[np.float32]) -> Image.Image:
    clean = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    return Image.fromarray((np.clip(clean, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """An image after the checks that need no pixel statistics (decoding, NaN, size)."""

    image: Image.Image | None
    failures: tuple[TechnicalCheck, ...]
    width: int
    height: int


def decode_and_check(image: ImageInput, limits: TechnicalLimits) -> DecodedImage:
    """Decode ``image`` and run the checks that need no statistics: undecodable, non-finite, too small.

    Float arrays are read as 0..1 (a VAE decode); their NaNs fail ``non_finite`` and are drawn black.
    """
    pil, float_arr = decode_image(image)
    failures: list[TechnicalCheck] = []
    if float_arr is not None:
        if 1.0 - float(np.isfinite(float_arr).mean()) > limits.max_non_finite:
            failures.append(TechnicalCheck.NON_FINITE)
        pil = _float_to_pil(float_arr)
    if pil is None:
        return DecodedImage(None, (TechnicalCheck.UNDECODABLE,), 0, 0)
    width, height = pil.size
    if min(width, height) < limits.min_side:
        failures.append(TechnicalCheck.TOO_SMALL)
    return DecodedImage(pil, tuple(failures), width, height)


def judge_pixels(
    decoded: DecodedImage, rgb: npt.NDArray[np.float32], limits: TechnicalLimits
) -> TechnicalReport:
    """The full report, from a sample of the image's pixels: ``rgb`` is ``[N, 3]`` on the 0..255 scale.

    Any faithful downsampling of the image will do (a box-reduced copy, or the model's own input).
    """
    lum = rgb @ _LUMA
    mean, std = float(lum.mean()), float(lum.std())
    rgb_std = float(rgb.std(axis=0).max())
    failures = list(decoded.failures)
    if max(std, rgb_std) < limits.min_std:
        failures.append(TechnicalCheck.UNIFORM)
    if mean <= limits.dark_mean:
        failures.append(TechnicalCheck.NEAR_BLACK)
    elif mean >= limits.bright_mean:
        failures.append(TechnicalCheck.NEAR_WHITE)
    return TechnicalReport(tuple(failures), decoded.width, decoded.height, mean, std)


def check_image(
    image: ImageInput, limits: TechnicalLimits | None = None
) -> tuple[TechnicalReport, Image.Image | None]:
    """Run every check on ``image``; return the report and the decoded RGB image (None if undecodable)."""
    limits = limits or TechnicalLimits()
    decoded = decode_and_check(image, limits)
    pil = decoded.image
    if pil is None:
        return TechnicalReport(decoded.failures, 0, 0, 0.0, 0.0), None
    # Statistics on a box-reduced copy of about 128 px a side: exact enough for means and spreads,
    # and far cheaper than the full image (Image.reduce is a plain block average).
    factor = max(1, min(decoded.width, decoded.height) // _STATS_SIDE)
    thumb = pil.reduce(factor) if factor > 1 else pil
    return judge_pixels(decoded, np.asarray(thumb, dtype=np.float32).reshape(-1, 3), limits), pil


def decode_rgb_array(image: ImageInput, limits: TechnicalLimits) -> tuple[DecodedImage, npt.NDArray[np.uint8] | None]:
    """:func:`decode_and_check`, with the picture as a ``H×W×3`` uint8 array (None when undecodable).

    An RGB PIL image or a uint8 ``H×W×3`` array takes no detour through another PIL image.
    """
    arr: npt.NDArray[np.uint8] | None = None
    if isinstance(image, Image.Image) and image.mode == "RGB":
        arr = np.asarray(image)
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        arr = image.astype(np.uint8, copy=False)
    if arr is not None:
        height, width = arr.shape[:2]
        failures = (TechnicalCheck.TOO_SMALL,) if min(width, height) < limits.min_side else ()
        return DecodedImage(None, failures, width, height), arr
    decoded = decode_and_check(image, limits)
    return decoded, None if decoded.image is None else np.asarray(decoded.image)


def judge_batch(
    decoded: list[DecodedImage], pixels: npt.NDArray[np.uint8], limits: TechnicalLimits
) -> list[TechnicalReport]:
    """:func:`judge_pixels` for a stack of same-sized images, ``[N, H, W, 3]`` uint8, in one go.

    The statistics come from every k-th pixel in each direction (about 128 a side): exact enough for
    means and spreads, and a fraction of the cost of the full images.
    """
    n, height, width = pixels.shape[:3]
    step = max(1, min(height, width) // _STATS_SIDE)
    # The sample channel-first ([N, 3, P], one gather): every reduction then runs along contiguous
    # rows, which torch vectorises (a reduction over the strided pixel axis of [N, P, 3] costs
    # several times more).
    sample = torch.from_numpy(np.ascontiguousarray(pixels[:, ::step, ::step].transpose(0, 3, 1, 2)))
    return _reports(decoded, sample.reshape(n, 3, -1), limits)


def judge_resized(
    decoded: list[DecodedImage], images: list[torch.Tensor], limits: TechnicalLimits
) -> list[TechnicalReport]:
    """:func:`judge_pixels` from the pictures already downsampled for the model: uint8 ``[3, h, w]``
    tensors (shortest side at the model's input size, before the centre crop, so the whole picture
    counts), read every k-th pixel so that at most about 128 a side are: nearly free."""
    reports: list[TechnicalReport | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for shape, idx in groups.items():
        step = -(-min(shape[1:]) // _STATS_SIDE)  # ceil: 64 px → every pixel, 224 px → every 2nd
        sample = torch.stack([images[i][:, ::step, ::step].reshape(3, -1) for i in idx])
        for i, report in zip(idx, _reports([decoded[i] for i in idx], sample, limits), strict=True):
            reports[i] = report
    return [r for r in reports if r is not None]


def _reports(decoded: list[DecodedImage], sample: torch.Tensor, limits: TechnicalLimits) -> list[TechnicalReport]:
    """Reports from a channel-first sample of each image's pixels, ``[N, 3, P]`` on the 0..255 scale."""
    sample = sample.float()
    lum = torch.from_numpy(_LUMA) @ sample  # [N, P]
    means, stds = lum.mean(dim=1), lum.std(dim=1, correction=0)
    rgb_std = sample.std(dim=2, correction=0).amax(dim=1)
    reports = []
    for d, mean, std, spread in zip(decoded, means.tolist(), stds.tolist(), rgb_std.tolist(), strict=True):
        failures = list(d.failures)
        if max(std, spread) < limits.min_std:
            failures.append(TechnicalCheck.UNIFORM)
        if mean <= limits.dark_mean:
            failures.append(TechnicalCheck.NEAR_BLACK)
        elif mean >= limits.bright_mean:
            failures.append(TechnicalCheck.NEAR_WHITE)
        reports.append(TechnicalReport(tuple(failures), d.width, d.height, mean, std))
    return reports
