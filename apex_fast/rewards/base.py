"""One reward protocol and a registry by name (docs/SPEC.md section 2).

A scorer maps (images, prompts, metadata) to FloatTensor [N]:
  images: uint8 numpy/tensor [N, H, W, 3] or float tensor [N, 3, H, W] in [0, 1]
  prompts: list[str] of length N; metadata: list[dict] of length N (may be empty dicts).
A sample the scorer cannot score is NaN; ``score_all`` also turns an exception (or a timeout) into
NaN for the whole batch of that scorer, so a reward never stops training; RewardFailureTracker
turns repeated whole-batch failures into one clear error; score_all_async overlaps scoring with
sampling on a worker thread.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
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
        x = images.detach()
        if x.dtype == torch.uint8:
            arr = x.cpu().numpy()
        else:
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"float images must be [N, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
            # quantise on the tensor's device, move uint8 (4x less than float32) to the host
            arr = (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
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


def make_scorer(name: str, /, **kwargs) -> Scorer:
    if name not in _REGISTRY:
        raise ValueError(f"rewards: unknown reward name {name!r}; available: {', '.join(available_scorers())}")
    scorer = _REGISTRY[name](**kwargs)
    if not getattr(scorer, "name", None):
        scorer.name = name
    return scorer


class RewardFailureError(RuntimeError):
    """A scorer failed for whole batches too many times in a row (see RewardFailureTracker)."""


class RewardFailureTracker:
    """Counts reward failures across batches; raises after a scorer failed ``max_consecutive``
    whole batches in a row (0 or None: never raise).

    A batch counts as failed for a scorer when it raised or timed out, or (``all_nan_is_failure``)
    returned NaN for every sample. Set ``all_nan_is_failure=False`` when whole batches may
    legitimately be unscorable (e.g. an OCR reward on prompts without a quoted target).
    Counters: ``nan_samples``, ``failed_batches``, ``batches``, ``streak`` (dicts by scorer name).
    """

    def __init__(self, max_consecutive: int | None = 5, all_nan_is_failure: bool = True):
        self.max_consecutive = max_consecutive
        self.all_nan_is_failure = all_nan_is_failure
        self.nan_samples: dict[str, int] = {}
        self.failed_batches: dict[str, int] = {}
        self.batches: dict[str, int] = {}
        self.streak: dict[str, int] = {}
        self.last_error: dict[str, str] = {}

    def update(self, names: Sequence[str], R: torch.Tensor, errors: dict[str, str] | None = None) -> None:
        """Record one batch: R [N, K] with column k from scorer ``names[k]``; ``errors`` maps the
        names of scorers that raised or timed out to a message. Raises RewardFailureError."""
        errors = errors or {}
        N = R.shape[0]
        for k, name in enumerate(names):
            nan = int(torch.isnan(R[:, k]).sum())
            self.nan_samples[name] = self.nan_samples.get(name, 0) + nan
            self.batches[name] = self.batches.get(name, 0) + 1
            failed = name in errors or (self.all_nan_is_failure and N > 0 and nan == N)
            if failed:
                self.failed_batches[name] = self.failed_batches.get(name, 0) + 1
                self.streak[name] = self.streak.get(name, 0) + 1
                self.last_error[name] = errors.get(name, f"all {N} samples NaN")
            else:
                self.streak[name] = 0
            if nan:
                log.info("reward %s: %d/%d samples NaN (total %d)", name, nan, N, self.nan_samples[name])
        bad = [n for n in names if self.max_consecutive and self.streak[n] >= self.max_consecutive]
        if bad:  # after every column is counted
            raise RewardFailureError("; ".join(
                f"reward {n!r} failed for {self.streak[n]} whole batches in a row (limit {self.max_consecutive}); "
                f"last failure: {self.last_error[n]}" for n in bad
            ) + ". Check the scorer (model path, scoring server) or raise the limit "
                "(RewardFailureTracker(max_consecutive=...), 0 disables).")

    def stats(self) -> dict[str, dict[str, int]]:
        return {n: {"batches": self.batches.get(n, 0), "failed_batches": self.failed_batches.get(n, 0),
                    "nan_samples": self.nan_samples.get(n, 0), "streak": self.streak.get(n, 0)} for n in self.batches}


def _call_with_timeout(fn, timeout_s: float | None):
    """fn() in a daemon thread, TimeoutError after timeout_s. The abandoned call keeps running in
    the background (Python threads cannot be killed); its result is dropped."""
    if not timeout_s:
        return fn()
    box: dict = {}

    def run():
        try:
            box["r"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["e"] = e

    t = threading.Thread(target=run, daemon=True, name="reward-timeout")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"timed out after {timeout_s:g} s")
    if "e" in box:
        raise box["e"]
    return box["r"]


def score_all(scorers: Sequence[Scorer], images, prompts, metadata, timings: dict | None = None, *,
              tracker: RewardFailureTracker | None = None, timeout_s: float | dict | None = None,
              errors: dict | None = None) -> torch.Tensor:
    """R [N, K] float32: column k is scorer k; NaN where a sample failed.

    A scorer that raises (or runs past ``timeout_s``, seconds, a float or a dict by scorer name)
    gives a NaN column and a logged warning; never an exception, except the clear
    RewardFailureError of an opt-in ``tracker`` after repeated whole-batch failures.
    ``timings[name]`` accumulates seconds per scorer; ``errors[name]`` gets the failure message.
    """
    N = len(prompts)
    if metadata is None:
        metadata = [{} for _ in range(N)]
    cols, errs = [], {}
    for s in scorers:
        name = getattr(s, "name", type(s).__name__)
        t0 = time.perf_counter()
        tmo = timeout_s.get(name) if isinstance(timeout_s, dict) else timeout_s
        try:
            r = _call_with_timeout(lambda: s(images, prompts, metadata), tmo)
            r = torch.as_tensor(r, dtype=torch.float32).flatten().cpu()
            if r.numel() != N:
                raise ValueError(f"scorer {name!r} returned {r.numel()} scores for {N} samples")
        except Exception as e:  # a reward must never stop training: NaN + log
            log.warning("reward %s failed for a batch of %d: %r", name, N, e)
            errs[name] = f"{type(e).__name__}: {e}"
            r = torch.full((N,), float("nan"))
        r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        cols.append(r)
    R = torch.stack(cols, 1) if cols else torch.zeros(N, 0)
    if errors is not None:
        errors.update(errs)
    if tracker is not None:
        tracker.update([getattr(s, "name", type(s).__name__) for s in scorers], R, errs)
    return R


_ASYNC_POOL: ThreadPoolExecutor | None = None
_ASYNC_LOCK = threading.Lock()


def score_all_async(scorers: Sequence[Scorer], images, prompts, metadata, timings: dict | None = None,
                    **kwargs) -> Future:
    """``score_all`` on one background worker thread, so scoring overlaps sampling; returns a
    Future of R [N, K]. Calls run in submission order. The caller must not modify ``images`` in
    place until the future is done; ``timings``/``tracker`` are updated from the worker thread
    (read them after ``result()``). A RewardFailureError surfaces from ``result()``."""
    global _ASYNC_POOL
    with _ASYNC_LOCK:
        if _ASYNC_POOL is None:
            _ASYNC_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-async")
    return _ASYNC_POOL.submit(score_all, scorers, images, prompts, metadata, timings, **kwargs)
