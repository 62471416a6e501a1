"""OCR reward (docs/SPEC.md section 2, as Flow-GRPO).

Target: the first double-quoted span of the prompt, ``a sign that says "Open 24h"`` -> ``Open 24h``.
As a convenience curly quotes are accepted too (``“Open 24h”``); whichever quoted span starts first
wins. ``metadata[i]["ocr_target"]`` (a str) overrides the prompt. A prompt without a closed quoted
span (and no override), or a target that is empty after normalisation, gives NaN for that sample.

Score: recognised text = all detected lines joined, spaces removed, lower-cased; the target is
normalised the same way. dist = 0 if the target is a substring of the recognised text, else
Levenshtein(rec, target), capped at len(target); r = 1 - dist / len(target), in [0, 1].

Engines (``engine=``): "rapidocr" (default; PP-OCR ONNX weights shipped inside the
rapidocr-onnxruntime wheel, runs offline on CPU), "tesseract" (pytesseract + the Debian
tesseract-ocr binary), "easyocr" (optional extra ``gpu``; pulls torchvision). The engine is created
lazily, once per scorer; an engine that cannot be created fails the call (and ``check()``) with its
fix. An engine error on one image gives NaN for that image only.
"""
from __future__ import annotations

import math
import re
import threading
from typing import Callable, Sequence

import numpy as np
import torch

from .base import register_scorer, to_uint8_hwc

_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def extract_target(prompt: str) -> str | None:
    """First "double-quoted" (or “curly-quoted”) span of the prompt; None if there is none."""
    m = _QUOTED.search(prompt or "")
    if m is None:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def normalize_text(s: str) -> str:
    """Spaces removed, lower-cased (SPEC 2). Only ' ' is removed, as Flow-GRPO does."""
    return s.replace(" ", "").lower()


def ocr_score(recognized_lines: Sequence[str], target: str) -> float:
    """SPEC 2 OCR reward for one image: 1 - min(dist, len(t)) / len(t), dist = 0 when the normalised
    target t is a substring of the normalised joined recognised lines, else their Levenshtein
    distance. NaN if the normalised target is empty."""
    from rapidfuzz.distance import Levenshtein

    t = normalize_text(target)
    if not t:
        return float("nan")
    rec = normalize_text("".join(recognized_lines))
    dist = 0 if t in rec else Levenshtein.distance(rec, t)
    dist = min(dist, len(t))
    return 1.0 - dist / len(t)


# ---------------------------------------------------------------- engines
# An engine is a callable: uint8 RGB [H, W, 3] numpy -> list[str] of recognised lines.


def _rapidocr_engine(**kwargs) -> Callable[[np.ndarray], list[str]]:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:  # pragma: no cover - it is a base dependency
        raise ImportError("ocr reward (engine='rapidocr') needs `pip install rapidocr-onnxruntime`") from e
    # Flow-GRPO calls PaddleOCR with cls=False: no text-angle classifier unless asked for (use_cls: true)
    eng = RapidOCR(**{"use_cls": False, **kwargs})

    def run(img: np.ndarray) -> list[str]:
        # a numpy input is taken as BGR (OpenCV convention) by rapidocr
        result, _ = eng(np.ascontiguousarray(img[..., ::-1]))
        return [str(r[1]) for r in (result or [])]

    run.rapidocr = eng  # the engine object, for inspection
    return run


def _tesseract_engine(lang: str = "eng", config: str = "") -> Callable[[np.ndarray], list[str]]:
    fix = "apt-get install tesseract-ocr && pip install pytesseract"
    try:
        import pytesseract
    except ImportError as e:
        raise ImportError(f"ocr reward (engine='tesseract') needs pytesseract and the tesseract binary: {fix}") from e
    try:
        pytesseract.get_tesseract_version()
    except Exception as e:  # TesseractNotFoundError and friends
        raise RuntimeError(f"ocr reward (engine='tesseract'): tesseract binary not found ({e!r}); fix: {fix}") from e
    from PIL import Image

    def run(img: np.ndarray) -> list[str]:
        txt = pytesseract.image_to_string(Image.fromarray(img), lang=lang, config=config)
        return [ln for ln in txt.splitlines() if ln.strip()]

    return run


def _easyocr_engine(langs: Sequence[str] = ("en",), gpu: bool | None = None, **kwargs) -> Callable[[np.ndarray], list[str]]:
    try:
        import easyocr
    except ImportError as e:
        raise ImportError(
            "ocr reward (engine='easyocr') needs easyocr, an optional extra that pulls torchvision: "
            "`pip install 'apex-fast[gpu]'` (or `pip install easyocr`) in a GPU environment; "
            "use engine='rapidocr' otherwise"
        ) from e
    if gpu is None:
        gpu = torch.cuda.is_available()
    reader = easyocr.Reader(list(langs), gpu=gpu, **kwargs)

    def run(img: np.ndarray) -> list[str]:
        return [str(t) for t in reader.readtext(img, detail=0)]

    return run


OCR_ENGINES: dict[str, Callable[..., Callable[[np.ndarray], list[str]]]] = {
    "rapidocr": _rapidocr_engine,
    "tesseract": _tesseract_engine,
    "easyocr": _easyocr_engine,
}


@register_scorer("ocr")
class OcrScorer:
    """SPEC 2 OCR reward in [0, 1]; NaN for a sample without a target or whose OCR failed.

    engine: "rapidocr" | "tesseract" | "easyocr", or a callable uint8 RGB [H, W, 3] -> list[str].
    engine_kwargs: passed to the engine factory (e.g. RapidOCR config, tesseract ``lang``).
    """

    name = "ocr"

    def __init__(self, engine: str | Callable = "rapidocr", engine_kwargs: dict | None = None):
        if isinstance(engine, str) and engine not in OCR_ENGINES:
            raise ValueError(f"ocr reward: unknown engine {engine!r}; available: {', '.join(OCR_ENGINES)}")
        self.engine_name = engine if isinstance(engine, str) else getattr(engine, "__name__", "custom")
        self._engine_spec = engine
        self._engine_kwargs = dict(engine_kwargs or {})
        self._engine: Callable[[np.ndarray], list[str]] | None = None
        self._lock = threading.Lock()  # one engine, used from one thread at a time
        self.last_failures = 0  # engine errors in the last call

    @property
    def engine(self) -> Callable[[np.ndarray], list[str]]:
        """The recogniser, created on first use (heavy imports happen here, not at import time)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    spec = self._engine_spec
                    self._engine = OCR_ENGINES[spec](**self._engine_kwargs) if isinstance(spec, str) else spec
        return self._engine

    def check(self) -> None:
        """Create the engine now (a missing engine or binary raises with the fix)."""
        _ = self.engine

    def recognize(self, img: np.ndarray) -> list[str]:
        eng = self.engine
        with self._lock:
            return eng(img)

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> torch.Tensor:
        arr = to_uint8_hwc(images)
        n = arr.shape[0]
        if len(prompts) != n:
            raise ValueError(f"ocr reward: {n} images but {len(prompts)} prompts")
        metadata = metadata if metadata else [{} for _ in range(n)]
        out = torch.full((n,), float("nan"), dtype=torch.float32)
        failures = 0
        for i in range(n):
            md = metadata[i] if i < len(metadata) and metadata[i] is not None else {}
            target = md.get("ocr_target") if isinstance(md.get("ocr_target"), str) else extract_target(prompts[i])
            if target is None or not normalize_text(target):
                continue
            _ = self.engine  # a missing engine fails the whole call (with its fix), not image by image
            try:
                lines = self.recognize(arr[i])
            except Exception:  # noqa: BLE001 - NaN for this image only
                failures += 1
                continue
            r = ocr_score(lines, target)
            if not math.isnan(r):
                out[i] = r
        self.last_failures = failures
        return out

    def __repr__(self) -> str:
        return f"OcrScorer(engine={self.engine_name!r})"
