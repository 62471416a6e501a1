"""Scorers behind one protocol + registry. Importing this package registers the built-in scorers.

Heavy dependencies (onnxruntime/rapidocr, transformers models) are imported lazily, when a scorer
first runs, not here.
"""
from .base import (
    RewardFailureError,
    ScorerBusyError,
    call_bounded,
    RewardFailureTracker,
    Scorer,
    available_scorers,
    make_scorer,
    register_scorer,
    score_all,
    score_all_async,
    to_uint8_hwc,
)
from . import simple as _simple  # noqa: F401  registers jpeg_*, colorfulness, contrast
from . import ocr as _ocr  # noqa: F401  registers ocr
from . import models as _models  # noqa: F401  registers pickscore, aesthetic, deqa (transformers imported lazily)
from . import remote as _remote  # noqa: F401  registers remote (client of the scoring server)
from . import preference as _preference  # noqa: F401  registers clip_score, hpsv2 (transformers imported lazily)
from . import alignment as _alignment  # noqa: F401  registers prompt_alignment (tiny testbed prompts)
from .models import RewardModelLoadError
from .remote import RemoteScorer, RemoteScorerError, start_server
from .ocr import extract_target, ocr_score
from .preflight import RewardSetupError, build_scorers, check_scorers

__all__ = [
    "Scorer", "available_scorers", "make_scorer", "register_scorer", "score_all", "score_all_async", "to_uint8_hwc",
    "RewardFailureError", "RewardFailureTracker", "RewardModelLoadError", "extract_target", "ocr_score",
    "RemoteScorer", "RemoteScorerError", "start_server", "ScorerBusyError", "call_bounded",
    "RewardSetupError", "build_scorers", "check_scorers",
]
