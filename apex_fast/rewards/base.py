"""One reward protocol and a registry by name (docs/SPEC.md section 2).

A scorer maps (images, prompts, metadata) to FloatTensor [N]:
  images: uint8 numpy/tensor [N, H, W, 3] or float tensor [N, 3, H, W] in [0, 1]
  prompts: list[str] of length N; metadata: list[dict] of length N (may be empty dicts).
A sample the scorer cannot score is NaN; ``score_all`` also turns an exception (or a timeout) into
NaN for the whole batch of that scorer, so a reward never stops training; RewardFailureTracker
turns repeated whole-batch failures into one clear error; score_all_async overlaps scoring with
sampling on a worker thread. ``score_all`` hands every scorer the batch as read-only uint8
[N, H, W, 3] numpy and its own copy of the metadata, and bounds every call (``call_bounded``).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
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


def unknown_scorer_args(type_: str, kwargs: dict) -> tuple[list[str], list[str]]:
    """(arguments of ``kwargs`` that scorer type ``type_`` does not take, the ones it takes)."""
    import inspect

    factory = _REGISTRY[type_]
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return [], []
    params = [p for p in sig.parameters.values() if p.name != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return [], [p.name for p in params]
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [k for k in kwargs if k not in valid], valid


class RewardFailureError(RuntimeError):
    """A scorer failed for whole batches too many times in a row (see RewardFailureTracker)."""


class RewardFailureTracker:
    """Counts reward failures across batches; raises after a scorer failed ``max_consecutive``
    whole batches in a row (0 or None: never raise).

    A batch counts as failed for a scorer when it raised or timed out, or (``all_nan_is_failure``)
    returned NaN for every sample. Set ``all_nan_is_failure=False`` when whole batches may
    legitimately be unscorable (e.g. an OCR reward on prompts without a quoted target), or list
    those rewards' keys in ``unscorable_ok`` (config: ``rewards[i].allow_unscorable``).
    Counters: ``nan_samples``, ``failed_batches``, ``batches``, ``streak`` (dicts by scorer name).
    """

    def __init__(self, max_consecutive: int | None = 5, all_nan_is_failure: bool = True,
                 unscorable_ok: Sequence[str] = ()):
        self.max_consecutive = max_consecutive
        self.all_nan_is_failure = all_nan_is_failure
        self.unscorable_ok = set(unscorable_ok)  # keys whose all-NaN batches are legitimate
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
            all_nan_fails = self.all_nan_is_failure and name not in self.unscorable_ok
            failed = name in errors or (all_nan_fails and N > 0 and nan == N)
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
                "(train.reward_max_failures, 0 disables); a reward that is legitimately unscorable for whole "
                "batches (OCR on prompts without quoted text) takes rewards[i].allow_unscorable=true.")

    def stats(self) -> dict[str, dict[str, int]]:
        return {n: {"batches": self.batches.get(n, 0), "failed_batches": self.failed_batches.get(n, 0),
                    "nan_samples": self.nan_samples.get(n, 0), "streak": self.streak.get(n, 0)} for n in self.batches}


class ScorerBusyError(TimeoutError):
    """A scorer is still inside an earlier call that timed out; no new call was started."""


_BUSY: dict[int, tuple[object, threading.Lock]] = {}
_BUSY_GUARD = threading.Lock()


def _busy_lock(scorer) -> threading.Lock:
    """One lock per scorer object: held while a call runs inside it (also after the caller gave up)."""
    with _BUSY_GUARD:
        entry = _BUSY.get(id(scorer))
        if entry is None or entry[0] is not scorer:
            entry = _BUSY[id(scorer)] = (scorer, threading.Lock())
        return entry[1]


def call_bounded(scorer, fn, timeout_s: float | None):
    """``fn()`` (a call into ``scorer``) on a daemon thread, waited for at most ``timeout_s`` seconds.

    Why a daemon thread: Python cannot kill a thread, so a hung scorer is abandoned, and a daemon
    thread never holds up the process exit (Ctrl-C, SIGTERM). No pile-up: at most one call runs
    inside a scorer; a call that timed out keeps the scorer busy until it really returns, and the
    next call waits for it within its own ``timeout_s`` and then fails fast (ScorerBusyError)
    without starting another call into the hung model. The waits are interruptible (Ctrl-C)."""
    lock = _busy_lock(scorer)
    t0 = time.monotonic()
    if not lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
        raise ScorerBusyError(f"timed out after {timeout_s:g} s: still busy with an earlier call that timed out "
                              f"(no new call started, so hung calls do not pile up)")
    box: dict = {}
    done = threading.Event()

    def run():
        try:
            box["r"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["e"] = e
        finally:
            lock.release()
            done.set()

    try:
        threading.Thread(target=run, daemon=True, name=f"reward-{getattr(scorer, 'name', 'scorer')}").start()
    except BaseException:
        lock.release()
        raise
    left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - t0))
    if not done.wait(left):
        raise TimeoutError(f"timed out after {timeout_s:g} s")
    if "e" in box:
        raise box["e"]
    return box["r"]


def _call_with_timeout(fn, timeout_s: float | None):
    """Back-compatible helper: ``fn()`` bounded by ``timeout_s`` (see call_bounded)."""
    return call_bounded(fn, fn, timeout_s)


def readonly_images(images) -> np.ndarray:
    """The batch as uint8 [N, H, W, 3] numpy that no scorer can change in place (one scorer's
    edit must not reach the next): a write raises ValueError, which fails only that scorer."""
    arr = to_uint8_hwc(images)
    if arr.flags.writeable:
        arr = arr.copy() if isinstance(images, np.ndarray) else arr
        arr.setflags(write=False)
    return arr


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
    images = readonly_images(images)
    cols, errs = [], {}
    for s in scorers:
        name = getattr(s, "name", type(s).__name__)
        t0 = time.perf_counter()
        tmo = timeout_s.get(name) if isinstance(timeout_s, dict) else timeout_s
        try:
            r = call_bounded(s, lambda: s(images, prompts, [dict(m or {}) for m in metadata]), tmo)
            r = scores_tensor(r, N, name)
        except Exception as e:  # a reward must never stop training: NaN + log
            log.warning("reward %r failed for a batch of %d: %s: %s", name, N, type(e).__name__, e)
            errs[name] = f"{type(e).__name__}: {e}"
            r = torch.full((N,), float("nan"))
        inf = int(torch.isinf(r).sum())
        if inf:  # inf is a scorer bug, not a score: counted as failed samples and said so
            log.warning("reward %r returned %d infinite score(s) of %d; they count as failed (NaN)", name, inf, N)
            if inf == N:
                errs.setdefault(name, f"returned inf for all {N} samples")
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


def scores_tensor(r, n: int, name: str) -> torch.Tensor:
    """A scorer's answer as float32 [n]; a clear ValueError naming the reward for anything else."""
    try:
        t = torch.as_tensor(r, dtype=torch.float32).flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"reward {name!r} returned {type(r).__name__} that is not numeric ({e})") from None
    if t.numel() != n:
        raise ValueError(f"reward {name!r} returned {t.numel()} scores for {n} samples")
    return t


class _DaemonWorker:
    """A one-thread executor whose thread is a daemon: queued scoring never holds up the process
    exit (concurrent.futures' pool joins its threads at exit, which waits out a hung scorer)."""

    def __init__(self, name: str):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._t = threading.Thread(target=self._loop, daemon=True, name=name)
        self._t.start()

    def _loop(self):
        while True:
            fut, fn, args, kwargs = self._q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(e)

    def submit(self, fn, *args, **kwargs) -> Future:
        fut: Future = Future()
        self._q.put((fut, fn, args, kwargs))
        return fut


_ASYNC_POOL: _DaemonWorker | None = None
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
            _ASYNC_POOL = _DaemonWorker("reward-async")
    return _ASYNC_POOL.submit(score_all, scorers, images, prompts, metadata, timings, **kwargs)
