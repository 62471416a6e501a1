"""Scorers behind one protocol + registry. Importing this package registers the built-in scorers.

Heavy dependencies (onnxruntime/rapidocr, transformers models) are imported lazily, when a scorer
first runs, not here.
"""
from .base import Scorer, available_scorers, make_scorer, register_scorer, score_all, to_uint8_hwc
from . import simple as _simple  # noqa: F401  registers jpeg_*, colorfulness, contrast
from . import ocr as _ocr  # noqa: F401  registers ocr
from .ocr import extract_target, ocr_score

__all__ = [
    "Scorer", "available_scorers", "make_scorer", "register_scorer", "score_all", "to_uint8_hwc",
    "extract_target", "ocr_score",
]
