"""Cheap offline image rewards (no model weights): JPEG (in)compressibility, colorfulness, contrast.

Scales (for 512x512 images), useful when checking that a balancer copes with very different
reward scales and in-group variances:
  jpeg_compressibility    -(JPEG size in kB at quality 95), DDPO's reward: about -250 (noise) .. -5 (flat)
  jpeg_incompressibility  +(JPEG size in kB at quality 95)
  colorfulness            Hasler & Suesstrunk (2003) M on uint8 RGB: 0 (gray) .. ~100+ (saturated)
  contrast                RMS contrast = std of BT.601 luma in [0, 1]: 0 (flat) .. 0.5 (black/white halves)
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .base import register_scorer, to_uint8_hwc


def jpeg_size_kb(img_hwc_uint8: np.ndarray, quality: int = 95) -> float:
    """Size in kB (1000 bytes, as DDPO) of the image saved as JPEG at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img_hwc_uint8)).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


def colorfulness_hasler(img_hwc_uint8: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003): M = sigma_rgyb + 0.3 * mu_rgyb, rg = R - G, yb = (R + G) / 2 - B,
    on 0..255 values. A gray image gives exactly 0."""
    x = img_hwc_uint8.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    sigma = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
    mu = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(sigma + 0.3 * mu)


def rms_contrast(img_hwc_uint8: np.ndarray) -> float:
    """RMS contrast: population std of the BT.601 luma (0.299 R + 0.587 G + 0.114 B) scaled to [0, 1]."""
    x = img_hwc_uint8.astype(np.float64) / 255.0
    y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return float(y.std())


class _PerImageScorer:
    """Applies a per-image numpy function; an error on one image gives NaN for that image only."""

    name = "per_image"

    def _one(self, img: np.ndarray) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        arr = to_uint8_hwc(images)
        out = torch.full((arr.shape[0],), float("nan"), dtype=torch.float32)
        for i in range(arr.shape[0]):
            try:
                out[i] = self._one(arr[i])
            except Exception:  # noqa: BLE001 - NaN for this sample, never raise
                pass
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@register_scorer("jpeg_incompressibility")
class JpegIncompressibility(_PerImageScorer):
    """JPEG size in kB at quality 95 (DDPO's ``jpeg_incompressibility``): higher = more detail/noise."""

    name = "jpeg_incompressibility"

    def __init__(self, quality: int = 95):
        self.quality = int(quality)

    def _one(self, img):
        return jpeg_size_kb(img, self.quality)


@register_scorer("jpeg_compressibility")
class JpegCompressibility(JpegIncompressibility):
    """Negative JPEG size in kB at quality 95 (DDPO's ``jpeg_compressibility``): higher = simpler image."""

    name = "jpeg_compressibility"

    def _one(self, img):
        return -jpeg_size_kb(img, self.quality)


@register_scorer("colorfulness")
class Colorfulness(_PerImageScorer):
    """Hasler & Suesstrunk (2003) colorfulness M on uint8 RGB (0 for gray images)."""

    name = "colorfulness"

    def _one(self, img):
        return colorfulness_hasler(img)


@register_scorer("contrast")
class Contrast(_PerImageScorer):
    """RMS contrast of the BT.601 luma in [0, 1]."""

    name = "contrast"

    def _one(self, img):
        return rms_contrast(img)
