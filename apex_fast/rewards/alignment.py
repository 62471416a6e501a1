"""Prompt alignment on the tiny testbed, offline: does the image show the colours the prompt names?

Prompts are the testbed's (`apex_fast.data.testbed`: "a red circle on the left on a blue background
with the word "SUN""). Two parts:

* `detect_scene(img, has_word)`: a simple detector (no learning). Each pixel takes the nearest
  palette colour; the background is the most common one on the border; the object is the most
  common other colour (in the top 60% of the image when a word is drawn below the shape); its shape
  comes from the mask's fill of its bounding box and the width of its top vs its bottom (a triangle
  is narrow on top, a square fills its box, a circle fills ~pi/4); its position from the centroid.
  The measurement script (bench/tiny_model.py) reports how often it agrees with the prompt.
* the ``prompt_alignment`` reward (dense, in [0, 1]): with a soft colour match
  k_c(p) = exp(-|p - c|^2 / (2 sigma^2)) (RGB 0..255, sigma 50),
  ``r = 0.5 * min(1, mean_p k_object / 0.15) + 0.5 * mean_p k_background`` - half for a large,
  clean object of the named colour, half for a clean background of the named colour. Text pixels
  match neither, so legible words cost alignment (a conflict with OCR), as does any other clutter.
  A prompt that names no testbed colours gives NaN.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..data.testbed import COLORS, POSITIONS, WORD_POSITIONS, parse_prompt
from .base import register_scorer, to_uint8_hwc

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float64)  # [C, 3]
SIGMA = 50.0
OBJECT_AREA = 0.15  # object coverage that earns the full object half of the reward
WORD_REGION = 0.6  # with a word, the shape is looked for in the top 60% of the rows


def nearest_color(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int [H, W] index into the palette (testbed.COLORS order)."""
    d = ((img[..., None, :].astype(np.float64) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def detect_scene(img: np.ndarray, has_word: bool = False) -> dict:
    """{'background', 'color', 'shape', 'position'} of the dominant object of uint8 [H, W, 3] `img`;
    'color'/'shape'/'position' are None when no object is found (under 1% of the region)."""
    h, w = img.shape[:2]
    cls = nearest_color(img)
    border = np.concatenate([cls[0], cls[-1], cls[:, 0], cls[:, -1]])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    out = {"background": _NAMES[bg], "color": None, "shape": None, "position": None}
    region = cls[: int(round(h * WORD_REGION))] if has_word else cls
    counts = np.bincount(region.ravel(), minlength=len(_NAMES))
    counts[bg] = 0
    obj = int(counts.argmax())
    if counts[obj] < 0.01 * region.size:
        return out
    out["color"] = _NAMES[obj]
    mask = region == obj
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = mask.sum() / ((y1 - y0) * (x1 - x0))
    q = max(1, (y1 - y0) // 4)
    top = mask[y0:y0 + q, x0:x1].any(0).sum()
    bottom = mask[y1 - q:y1, x0:x1].any(0).sum()
    if top < 0.6 * bottom:
        out["shape"] = "triangle"
    elif fill > 0.88:
        out["shape"] = "square"
    else:
        out["shape"] = "circle"
    cx, cy = xs.mean() / w, ys.mean() / h
    # with a word the shape sits in the top band: only left / centre / right are told apart
    cands = WORD_POSITIONS if has_word else tuple(POSITIONS)
    out["position"] = min(cands, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (not has_word) * (POSITIONS[k][1] - cy) ** 2)
    return out


def alignment_score(img: np.ndarray, color: str, background: str) -> float:
    """The prompt_alignment reward of one uint8 [H, W, 3] image (module docstring)."""
    x = img.astype(np.float64)

    def match(name: str) -> float:
        d2 = ((x - np.array(COLORS[name], dtype=np.float64)) ** 2).sum(-1)
        return float(np.exp(-d2 / (2 * SIGMA**2)).mean())

    return 0.5 * min(1.0, match(color) / OBJECT_AREA) + 0.5 * match(background)


@register_scorer("prompt_alignment")
class PromptAlignment:
    """Dense offline prompt alignment for testbed prompts (see the module docstring); NaN for other prompts."""

    name = "prompt_alignment"

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        arr = to_uint8_hwc(images)
        out = torch.full((arr.shape[0],), float("nan"), dtype=torch.float32)
        for i in range(arr.shape[0]):
            scene = parse_prompt(prompts[i]) if i < len(prompts) else None
            if scene is not None:
                out[i] = alignment_score(arr[i], scene.color, scene.background)
        return out

    def __repr__(self) -> str:
        return "PromptAlignment()"


__all__ = ["PromptAlignment", "alignment_score", "detect_scene", "nearest_color"]
