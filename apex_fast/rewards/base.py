"""One reward protocol and a registry by name (docs/SPEC.md section 2).

A scorer maps (images, prompts, metadata) to FloatTensor [N]:
  images: uint8 numpy/tensor [N, H, W, 3] or float tensor [N, 3, H, W] in [0, 1]
  prompts: list[str] of length N; metadata: list[dict] of length N (may be empty dicts).
A sample the scorer cannot score is NaN; ``score_all`` also turns an exception into NaN for the
whole batch of that scorer, so a reward never stops training.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

log = logging.getLogger(__name__)


@runtime_checkable
class Scorer(Protocol):
    name: str

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor: ...


def to_uint8_hwc(images) -> np.ndarray:
    """Any accepted image batch -> uint8 numpy [N, H, W, 3]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.dtype == torch.uint8:
            arr = x.numpy()
        else:
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"float images must be [N, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
            arr = (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    else:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 [N, H, W, 3], got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] uint8, got shape {arr.shape}")
    return arr


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str):
    """Class or factory decorator: ``@register_scorer("jpeg")``."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def available_scorers() -> list[str]:
    return sorted(_REGISTRY)


def make_scorer(name: str, **kwargs) -> Scorer:
    if name not in _REGISTRY:
        raise ValueError(f"rewards: unknown reward name {name!r}; available: {', '.join(available_scorers())}")
    scorer = _REGISTRY[name](**kwargs)
    if not getattr(scorer, "name", None):
        scorer.name = name
    return scorer


def score_all(scorers: Sequence[Scorer], images, prompts, metadata, timings: dict | None = None) -> torch.Tensor:
    """R [N, K] float32: column k is scorer k; NaN where a sample failed (never raises)."""
    N = len(prompts)
    if metadata is None:
        metadata = [{} for _ in range(N)]
    cols = []
    for s in scorers:
        t0 = time.perf_counter()
        try:
            r = torch.as_tensor(s(images, prompts, metadata), dtype=torch.float32).flatten().cpu()
            if r.numel() != N:
                raise ValueError(f"scorer {s.name!r} returned {r.numel()} scores for {N} samples")
        except Exception as e:  # a reward must never stop training: NaN + log
            log.warning("reward %s failed for a batch of %d: %r", s.name, N, e)
            r = torch.full((N,), float("nan"))
        r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))
        if timings is not None:
            timings[s.name] = timings.get(s.name, 0.0) + time.perf_counter() - t0
        cols.append(r)
    return torch.stack(cols, 1) if cols else torch.zeros(N, 0)
